"""Build the python-socketio server and the WSGI callable around it.

``SocketServer`` is python-socketio's server held to the Socket.IO 5
protocol's MUSTs, as Node's socket.io-parser and its ``Client`` apply them:

- packets are decoded strictly (``decode_packet``): an unknown type, a
  payload of the wrong shape (``42{}``), an ack id that is not a number
  (``42abc[…]``), a client-sent CONNECT_ERROR (``44``), JSON that does not
  decode or nests too deeply, an EVENT or DISCONNECT for a namespace the
  client is not in, or a binary attachment nobody announced: each logs one
  line (no traceback) and closes the Engine.IO session. python-socketio
  logged a traceback and kept most of these sessions;
- a CONNECT whose payload is not an object is such a violation, not
  ``token_missing``;
- a CONNECT to any namespace but ``/``, or a second one to ``/``, is
  answered ``{"message", "data": {"code": "namespace_invalid"}}``: protocol
  v5 wants an object there, and socket.io-client reads ``err.data.code``;
- an Engine.IO session that is not admitted to ``/`` within
  ``ORGCAST_CONNECT_TIMEOUT`` seconds is closed, refused ones included, as
  Node's ``connectTimeout`` does; so is one that leaves ``/`` and does not
  come back within that time.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

import socketio
from socketio import packet as sio_packet

from app.auth.credentials import Network, client_address, is_trusted, parse_networks
from app.config import Settings
from app.errors import API_ERRORS, connect_error, error_body, status_line
from app.rooms import RESERVED_EVENTS
from app.timers import Timer, Timers
from app.transport.engine import EngineServer

SOCKETIO_PATH = "socket.io"
NAMESPACE = "/"

#: most binary attachments one packet may announce
MAX_ATTACHMENTS = 10
#: seconds a disconnected client has to close its connection itself
KICK_GRACE = 1.0
#: what the connect check reads of a session's WSGI environ
_KEPT_ENVIRON = ("QUERY_STRING", "HTTP_AUTHORIZATION", "REMOTE_ADDR")
#: environ key of the client's address (the peer, or what a trusted proxy reports)
ADDRESS_KEY = "orgcast.address"

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

log = logging.getLogger(__name__)
#: lines a client can cause: rate-limited by app/log.py
client_log = logging.getLogger("app.client")

#: what /admin says while X-Forwarded-For has come from a peer that is not a trusted proxy
UNTRUSTED_FORWARDING = ("X-Forwarded-For arrives from a peer not in ORGCAST_TRUSTED_PROXIES: every client behind "
                        "it counts as that one address, and the per-address limits apply to all of them at once.")


class PacketError(ValueError):
    """A Socket.IO packet that breaks the protocol."""


def decode_packet(data: str) -> sio_packet.Packet:
    """Decode one Socket.IO packet a client sent, as strictly as socket.io-parser.

    :raise PacketError: anything socket.io-parser would refuse, and a client-sent CONNECT_ERROR
    """
    if not data or not data[0].isdigit():
        raise PacketError("packet type is not a digit")
    kind = int(data[0])
    if kind > sio_packet.BINARY_ACK or kind == sio_packet.CONNECT_ERROR:
        raise PacketError(f"packet type {kind} is not one a client sends")
    rest = data[1:]
    attachments = 0
    if kind in (sio_packet.BINARY_EVENT, sio_packet.BINARY_ACK):
        count, dash, rest = rest.partition("-")
        if not dash or not count.isdigit() or len(count) > 2 or int(count) > MAX_ATTACHMENTS:
            raise PacketError("bad attachment count")
        attachments = int(count)
    namespace = NAMESPACE
    if rest.startswith("/"):
        namespace, comma, rest = rest.partition(",")
        if not comma:
            rest = ""
        namespace = namespace.partition("?")[0]
    ack_id = None
    digits = len(rest) - len(rest.lstrip("0123456789"))
    if digits:
        if digits > 15:
            raise PacketError("ack id too long")
        ack_id, rest = int(rest[:digits]), rest[digits:]
    payload: Any = None
    if rest:
        try:
            payload = json.loads(rest)
        except (ValueError, RecursionError):
            raise PacketError("payload is not JSON") from None
    _check_payload(kind, payload, rest != "")
    pkt = sio_packet.Packet(kind, data=payload, namespace=namespace, id=ack_id, binary=False)
    pkt.attachment_count = attachments
    return pkt


def _check_payload(kind: int, payload: Any, present: bool) -> None:
    if kind == sio_packet.CONNECT:
        ok = not present or isinstance(payload, dict)
    elif kind == sio_packet.DISCONNECT:
        ok = not present
    elif kind in (sio_packet.EVENT, sio_packet.BINARY_EVENT):
        ok = (isinstance(payload, list) and len(payload) > 0
              and (isinstance(payload[0], str) and payload[0] not in RESERVED_EVENTS
                   or isinstance(payload[0], int) and not isinstance(payload[0], bool)))
    else:  # ACK, BINARY_ACK
        ok = isinstance(payload, list)
    if not ok:
        raise PacketError(f"invalid payload for packet type {kind}")


class RoomsManager(socketio.Manager):  # type: ignore[misc]
    """python-socketio's manager, with an index of the rooms each socket is in.

    python-socketio's ``basic_disconnect`` finds a socket's rooms by copying
    and scanning every room of the namespace: each disconnect is O(rooms), and
    15,000 sockets leaving at once (a deploy, a network cut) kept a core busy
    for minutes. The index makes it O(the socket's rooms).
    """

    def __init__(self) -> None:
        super().__init__()
        self._rooms_of: dict[str, dict[str, list[Any]]] = {}

    # internal: socketio.manager.Manager.basic_enter_room
    def basic_enter_room(self, sid: str, namespace: str, room: Any, eio_sid: str | None = None) -> None:
        super().basic_enter_room(sid, namespace, room, eio_sid=eio_sid)
        rooms = self._rooms_of.setdefault(namespace, {}).setdefault(sid, [])
        if room not in rooms:
            rooms.append(room)

    # internal: socketio.manager.Manager.basic_leave_room
    def basic_leave_room(self, sid: str, namespace: str, room: Any) -> None:
        super().basic_leave_room(sid, namespace, room)
        rooms = self._rooms_of.get(namespace, {}).get(sid)
        if rooms is not None and room in rooms:
            rooms.remove(room)
            if not rooms:
                del self._rooms_of[namespace][sid]

    # internal: socketio.manager.Manager.basic_disconnect
    def basic_disconnect(self, sid: str, namespace: str, **kwargs: Any) -> None:
        if namespace not in self.rooms:
            return
        for room in list(self._rooms_of.get(namespace, {}).get(sid, ())):
            self.basic_leave_room(sid, namespace, room)
        # What python-socketio's basic_disconnect does after leaving the rooms.
        self.callbacks.pop(sid, None)
        for pending in (self.pending_connect, self.pending_disconnect):
            if namespace in pending and sid in pending[namespace]:
                pending[namespace].remove(sid)
                if not pending[namespace]:
                    del pending[namespace]

    # internal: socketio.manager.Manager.get_rooms
    def get_rooms(self, sid: str, namespace: str) -> list[Any]:
        return [room for room in self._rooms_of.get(namespace, {}).get(sid, ()) if room is not None]

    def pre_connect_as(self, sid: str, eio_sid: str, namespace: str) -> None:
        """python-socketio's pre_connect with a given sid (a recovered socket keeps its id)."""
        self.basic_enter_room(sid, namespace, None, eio_sid=eio_sid)
        self.basic_enter_room(sid, namespace, sid, eio_sid=eio_sid)
        self.pending_connect.setdefault(namespace, []).append(sid)


class SocketServer(socketio.Server):  # type: ignore[misc]
    """python-socketio's server on ``EngineServer``, with the rules above."""

    def __init__(self, *, connect_timeout: float, timers: Timers, max_pending_per_address: int = 0,
                 trusted_proxies: tuple[Network, ...] = (), **kwargs: Any) -> None:
        # No service task walking every session: pings and their timeouts are timers.
        super().__init__(monitor_clients=False, **kwargs)
        #: called for each session refused 429 by the per-address cap (the metrics)
        self.on_pending_refused: Callable[[], None] | None = None
        self.connect_timeout = connect_timeout
        self.timers = timers
        self.eio.timers = timers
        self._max_pending = max_pending_per_address
        self._trusted = trusted_proxies
        #: sessions not admitted yet, per client address (and the address of each)
        self._pending_per_address: Counter[str] = Counter()
        self._pending_address: dict[str, str] = {}
        #: Engine.IO sessions not (or no longer) admitted to "/", with their deadline
        self._pending: dict[str, Timer] = {}
        #: binary attachments still expected, by Engine.IO session
        self._attachments: dict[str, int] = {}
        #: X-Forwarded-For came from a peer that is not a trusted proxy (warned once; /admin shows it)
        self.untrusted_forwarding = False

    # internal: socketio.server.Server._engineio_server_class
    def _engineio_server_class(self) -> type[EngineServer]:
        return EngineServer

    # --- admission deadline

    # internal: socketio.server.Server._handle_eio_connect
    def _handle_eio_connect(self, eio_sid: str, environ: dict[str, Any]) -> bool:
        """Open a session, unless its address holds too many that are not admitted (429)."""
        address = client_address(environ, self._trusted)
        if not self.untrusted_forwarding and environ.get("HTTP_X_FORWARDED_FOR") and not is_trusted(
                str(environ.get("REMOTE_ADDR", "")), self._trusted):
            # Behind a proxy that is not trusted every client is one address, and the
            # per-address limits apply to all of them at once (issue 18): say so, once.
            self.untrusted_forwarding = True
            log.warning("X-Forwarded-For arrives from %s, which is not in ORGCAST_TRUSTED_PROXIES: every client "
                        "behind it counts as that one address; list the proxy there", address)
        if self._max_pending and self._pending_per_address[address] >= self._max_pending:
            client_log.info("refused an Engine.IO session of %s: %d not admitted yet", address,
                            self._pending_per_address[address])
            if self.on_pending_refused is not None:
                self.on_pending_refused()
            return False
        # python-socketio keeps the environ for the session's life; keep only
        # what the connect check reads (credentials, the client's address).
        kept = {k: environ[k] for k in _KEPT_ENVIRON if k in environ}
        kept[ADDRESS_KEY] = address
        super()._handle_eio_connect(eio_sid, kept)
        self._pending_per_address[address] += 1
        self._pending_address[eio_sid] = address
        self._arm(eio_sid)
        return True

    def _admitted(self, eio_sid: str) -> None:
        pending = self._pending.pop(eio_sid, None)
        if pending is not None:
            pending.cancel()
        address = self._pending_address.pop(eio_sid, None)
        if address is not None:
            self._pending_per_address[address] -= 1
            if self._pending_per_address[address] <= 0:
                del self._pending_per_address[address]

    def _arm(self, eio_sid: str, delay: float | None = None) -> None:
        old = self._pending.pop(eio_sid, None)
        if old is not None:
            old.cancel()
        self._pending[eio_sid] = self.timers.call_later(
            self.connect_timeout if delay is None else delay, self._admission_expired, eio_sid)

    def _admission_expired(self, eio_sid: str) -> None:
        self._pending.pop(eio_sid, None)
        if self.manager.sid_from_eio_sid(eio_sid, NAMESPACE) is None and eio_sid in self.eio.sockets:
            client_log.info("closing an Engine.IO session that is not admitted to the namespace")
            # Out of the timer greenlet: the disconnect handlers run in the session's own.
            session = self.eio.sockets[eio_sid]
            session._later(self.eio.disconnect, eio_sid)

    # internal: socketio.server.Server._handle_eio_disconnect
    def _handle_eio_disconnect(self, eio_sid: str, reason: Any) -> None:
        self._admitted(eio_sid)  # no longer pending, whatever it was
        self._attachments.pop(eio_sid, None)
        super()._handle_eio_disconnect(eio_sid, reason)

    # internal: socketio.server.Server.disconnect
    def disconnect(self, sid: str, namespace: str | None = None, ignore_queue: bool = False) -> None:
        """Disconnect a socket, and close its connection soon after (Node's ``disconnect(true)``).

        python-socketio leaves the Engine.IO session open, which would then
        only end at ORGCAST_CONNECT_TIMEOUT. Official clients close it
        themselves on a server disconnect; ``KICK_GRACE`` seconds lets them
        (python-socketio's polling client hangs when the close overtakes it),
        then the server closes it for those that do not.
        """
        eio_sid = self.manager.eio_sid_from_sid(sid, namespace or NAMESPACE)
        super().disconnect(sid, namespace=namespace, ignore_queue=ignore_queue)
        if eio_sid is not None and eio_sid in self.eio.sockets:
            self._arm(eio_sid, min(KICK_GRACE, self.connect_timeout))

    def close_all(self) -> int:
        """Close every Engine.IO session of this process; return how many.

        Clients see their transport close (not a namespace disconnect) and
        reconnect at once, to another worker, which can recover their
        sessions: what a worker does before it stops.
        """
        sessions = list(self.eio.sockets.values())
        with self.namespace_handlers[NAMESPACE].closing_all():
            for session in sessions:
                session.close(wait=False, abort=False, reason=self.eio.reason.SERVER_DISCONNECT)
        log.info("closed %d sessions before stopping", len(sessions))
        return len(sessions)

    def admit_stream(self, stream: Any, admission: Any) -> str:
        """Admit a Server-Sent Events stream as a socket of "/" (``http/stream.py``); return its sid.

        The stream is an Engine.IO session of its own kind in ``eio.sockets``,
        so that fan-out, kicks, revocations, expiry, presence and the metrics
        treat it as every other socket.
        """
        handler = self.namespace_handlers[NAMESPACE]
        self.eio.sockets[stream.sid] = stream
        sid = self.eio.generate_id()
        self.manager.pre_connect_as(sid, stream.sid, NAMESPACE)
        missed = handler.admit(sid, admission)
        self.manager.connect(sid, NAMESPACE)
        if admission.resync:
            stream.resync()
        handler.replay(sid, missed)
        return str(sid)

    # internal: socketio.server.Server._handle_connect
    def _handle_connect(self, eio_sid: str, namespace: str, data: Any) -> None:
        """Admit a CONNECT to "/" (python-socketio's, in orgcast's order).

        The namespace checks it (and whether its session is recovered) before
        the socket exists; the ack carries the private session id, and a
        recovered socket then receives what it missed before anything new.
        """
        handler = self.namespace_handlers[NAMESPACE]
        try:
            admission = handler.admission(self.environ.get(eio_sid, {}), data, eio_sid)
        except socketio.exceptions.ConnectionRefusedError as exc:
            # internal: socketio.Server._send_packet
            self._send_packet(eio_sid, self.packet_class(sio_packet.CONNECT_ERROR, data=exc.error_args,
                                                         namespace=NAMESPACE))
            return
        session = self.eio.sockets.get(eio_sid)
        if session is None or session.closed:
            return  # the client left during the check
        old_sid = admission.recovering[1] if admission.recovering else None
        sid = old_sid if old_sid and self.manager.eio_sid_from_sid(old_sid, NAMESPACE) is None \
            else self.eio.generate_id()
        self.manager.pre_connect_as(sid, eio_sid, NAMESPACE)
        missed = handler.admit(sid, admission)
        pid = handler.pid_of(sid)
        ack: dict[str, Any] = {"sid": sid} if pid is None else {"sid": sid, "pid": pid}
        # internal: socketio.Server._send_packet
        self._send_packet(eio_sid, self.packet_class(sio_packet.CONNECT, ack, namespace=NAMESPACE))
        self.manager.connect(sid, NAMESPACE)
        handler.replay(sid, missed)

    # --- packets

    # internal: socketio.server.Server._handle_eio_message
    def _handle_eio_message(self, eio_sid: str, data: Any) -> None:
        try:
            self._dispatch(eio_sid, data)
        except PacketError as exc:
            client_log.info("closing Engine.IO session: Socket.IO protocol error: %s", exc)
            self.eio.disconnect(eio_sid)

    def _dispatch(self, eio_sid: str, data: Any) -> None:
        if not isinstance(data, str):
            # A binary attachment: only after a packet that announced it.
            left = self._attachments.get(eio_sid, 0)
            if not left:
                raise PacketError("binary data nobody announced")
            if left == 1:
                del self._attachments[eio_sid]
            else:
                self._attachments[eio_sid] = left - 1
            return
        if eio_sid in self._attachments:
            raise PacketError("a packet arrived before the announced binary attachments")
        pkt = decode_packet(data)
        namespace = pkt.namespace
        admitted = self.manager.sid_from_eio_sid(eio_sid, namespace) is not None
        kind = pkt.packet_type
        if kind == sio_packet.CONNECT:
            if namespace != NAMESPACE or admitted:
                # internal: socketio.Server._send_packet
                self._send_packet(eio_sid, self.packet_class(
                    sio_packet.CONNECT_ERROR, data=connect_error("namespace_invalid"),
                    namespace=namespace))
                self.namespace_handlers[NAMESPACE].refused_namespace(
                    self.environ.get(eio_sid, {}).get(ADDRESS_KEY, "-"), eio_sid)
                return
            self._handle_connect(eio_sid, namespace, pkt.data)
            if self.manager.sid_from_eio_sid(eio_sid, NAMESPACE) is not None:
                self._admitted(eio_sid)
            return
        if not admitted:
            raise PacketError(f"packet type {kind} for a namespace the client is not in")
        if kind == sio_packet.DISCONNECT:
            # internal: socketio.Server._handle_disconnect
            self._handle_disconnect(eio_sid, namespace, self.reason.CLIENT_DISCONNECT)
            self._arm(eio_sid)
        elif kind in (sio_packet.BINARY_EVENT, sio_packet.BINARY_ACK):
            # Clients cannot publish and orgcast's client events take JSON:
            # swallow the attachments, ignore the event.
            if pkt.attachment_count:
                self._attachments[eio_sid] = pkt.attachment_count
            log.debug("ignored a binary packet from a client")
        elif kind == sio_packet.EVENT:
            # internal: socketio.Server._handle_event
            self._handle_event(eio_sid, namespace, pkt.id, pkt.data)
        else:
            # internal: socketio.Server._handle_ack
            self._handle_ack(eio_sid, namespace, pkt.id, pkt.data)


def build_server(settings: Settings, client_manager: socketio.Manager | None, timers: Timers) -> SocketServer:
    """Return a gevent-mode Socket.IO server configured from the settings."""
    origins: str | list[str] | None
    if settings.cors_origins == ("*",):
        origins = "*"
    else:
        origins = list(settings.cors_origins) or None  # None: same origin only
    return SocketServer(
        connect_timeout=settings.connect_timeout,
        timers=timers,
        max_pending_per_address=settings.max_pending_per_address,
        trusted_proxies=parse_networks(settings.trusted_proxies),
        async_mode="gevent",
        client_manager=client_manager,
        cors_allowed_origins=origins,
        max_http_buffer_size=settings.max_payload,
        transports=list(settings.effective_transports),
        ping_interval=settings.ping_interval,
        ping_timeout=settings.ping_timeout,
        always_connect=False,
        # A client's events run in order, in its session's greenlet (engine.py), not one
        # greenlet each: two subscribes at once raced (issue 18).
        async_handlers=False,
        # Loggers, not False: given False, python-socketio and python-engineio
        # each add a plain stderr handler of their own, which bypasses
        # redaction (app/log.py configures these two).
        logger=logging.getLogger("socketio"),
        engineio_logger=logging.getLogger("engineio"),
    )


def build_wsgi(sio: socketio.Server, flask_app: WSGIApp, settings: Settings) -> WSGIApp:
    """Mount Socket.IO beside Flask in one WSGI callable."""
    app: WSGIApp = socketio.WSGIApp(sio, flask_app, socketio_path=SOCKETIO_PATH)
    if "polling" not in settings.effective_transports:
        app = _refuse_polling(app)
    return app


def _refuse_polling(app: WSGIApp) -> WSGIApp:
    """Answer polling requests with a clear JSON 400 instead of 'Invalid transport'.

    With several workers a polling session's requests land on different
    processes and would meet ``400 Invalid session`` (README, "Workers,
    long-polling and sticky sessions").
    """
    prefix = "/" + SOCKETIO_PATH
    entry = API_ERRORS["polling_disabled"]
    body = json.dumps(error_body(entry.code)).encode()

    def middleware(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "").startswith(prefix):
            transport = parse_qs(environ.get("QUERY_STRING", "")).get("transport", [""])[0]
            if transport == "polling":
                start_response(status_line(entry.status), [
                    ("Content-Type", "application/json"),
                    ("Content-Length", str(len(body))),
                ])
                return [body]
        return app(environ, start_response)

    return middleware
