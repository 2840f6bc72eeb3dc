"""Engine.IO: python-engineio's server, held to the protocol's MUSTs.

python-engineio 4.x keeps the session table, the polling queue, the upgrade
handshake, CORS and the packet classes; this module replaces what the
official protocol test suite (socketio/engine.io-protocol, ``test-suite/``)
and the README's "Limits that protect the process" found wrong or lenient:

- ``handle_request`` is python-engineio 4.15's, reordered so that every
  refusal comes before any side effect and says what failed in orgcast's
  JSON error body: a missing ``transport`` is a 400 (python-engineio
  assumed polling), a method other than GET/POST/OPTIONS is a 400, a POST
  to a closed session is a 400 (python-engineio raised ``KeyError`` into a
  500), JSONP is refused (Engine.IO 4 clients never use it), a POST answers
  ``ok``.
- Incoming packets are decoded strictly (``decode_packet``): a type that is
  not 0-6, a client-sent OPEN/NOOP, or a body that does not decode closes
  the session (python-engineio parsed message payloads as JSON, raised
  ``RecursionError`` out of the reader on ``4[[[[…``, and kept sessions
  that sent garbage).
- Polling: a second concurrent GET is refused at once and ends the session
  (the pending one receives the close packet ``1``); a session the client
  closes answers its pending GET with ``6`` (python-engineio sent an empty
  body, which engine.io-parser reads as an error).
- WebSocket sessions write without a writer greenlet (see
  ``transport/websocket.py``), and a session that ends closes its TCP
  connection.
- The OPEN packet announces ``pingInterval`` in milliseconds without
  truncating fractions of a second (python-engineio sent ``int(0.3) * 1000``).
- Pings and ping timeouts are entries in the process's one timer heap
  (``timers.py``), not a sleeping greenlet per session plus a
  service task that walks every session.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

import engineio
import gevent
from engineio import exceptions as eio_exceptions
from engineio import packet as eio_packet
from engineio import socket as eio_socket

from app import process
from app.errors import http_error
from app.timers import Timers
from app.transport.connection import Connection
from app.transport.websocket import ACCEPT_KEY, WebSocket, encode_frame

log = logging.getLogger(__name__)

PACKET_TYPES_FROM_CLIENT = frozenset({eio_packet.CLOSE, eio_packet.PING, eio_packet.PONG,
                                      eio_packet.MESSAGE, eio_packet.UPGRADE})
#: most packets one polling POST may carry (python-engineio's limit too)
MAX_PACKETS_PER_POST = 16


class ProtocolViolation(eio_exceptions.EngineIOError):  # type: ignore[misc]
    """The client broke the Engine.IO protocol; the session must end."""


def decode_packet(raw: str | bytes) -> eio_packet.Packet:
    """Decode one packet a client sent; text payloads stay text.

    :raise ProtocolViolation: not an Engine.IO 4 packet a client may send
    """
    if isinstance(raw, bytes | bytearray):
        return eio_packet.Packet(eio_packet.MESSAGE, bytes(raw))
    if not raw or not raw[0].isdigit():
        raise ProtocolViolation("packet type is not a digit")
    kind = int(raw[0])
    if kind not in PACKET_TYPES_FROM_CLIENT:
        raise ProtocolViolation(f"packet type {kind} is not one a client sends")
    return eio_packet.Packet(kind, raw[1:])


def decode_payload(body: str) -> list[eio_packet.Packet]:
    """Decode a polling POST body: packets separated by ``\\x1e``, binary as ``b<base64>``.

    :raise ProtocolViolation: an empty body, too many packets, or one that does not decode
    """
    if not body:
        raise ProtocolViolation("empty payload")
    parts = body.split("\x1e")
    if len(parts) > MAX_PACKETS_PER_POST:
        raise ProtocolViolation("too many packets in one payload")
    packets = []
    for part in parts:
        if part.startswith("b"):
            try:
                packets.append(eio_packet.Packet(eio_packet.MESSAGE,
                                                 base64.b64decode(part[1:], validate=True)))
            except (binascii.Error, ValueError):
                raise ProtocolViolation("invalid base64 packet") from None
        else:
            packets.append(decode_packet(part))
    return packets


class _NoQueue:
    """The queue of a session that writes to its WebSocket directly: takes nothing."""

    def put(self, item: Any) -> None:
        pass

    def join(self) -> None:
        pass

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        raise eio_exceptions.QueueEmpty()

    def task_done(self) -> None:
        pass


NO_QUEUE = _NoQueue()


class EngineSocket(eio_socket.Socket):  # type: ignore[misc]
    """One Engine.IO session: polling as python-engineio does it, websocket our way."""

    def __init__(self, server: EngineServer, sid: str) -> None:
        super().__init__(server, sid)
        #: the WebSocket once the session has one; sends then bypass the queue
        self.ws: WebSocket | None = None
        self.polling_now = False
        self._ping_seq = 0
        self._pending: deque[tuple[Any, tuple[Any, ...]]] | None = None
        self._runner: gevent.Greenlet | None = None
        #: while the socket's history is read: what keeps its events in order and once (realtime/fanout.py)
        self.gate: Any = None

    # --- heartbeat

    # internal: engineio.socket.Socket.schedule_ping
    def schedule_ping(self) -> None:
        """Ping in ``ping_interval`` seconds (python-engineio: after each pong)."""
        if self.last_ping:  # type: ignore[has-type]
            self.last_ping = None
            self.server.timers.call_later(self.server.ping_interval, self._ping,
                                          time.monotonic() + self.server.ping_interval)

    def _ping(self, due: float) -> None:
        if self.closing or self.closed:
            return
        self._ping_seq += 1
        self.last_ping = time.time()  # type: ignore[assignment]
        self.send(eio_packet.Packet(eio_packet.PING))
        # The deadline counts from when the ping was due, as Node's timers do,
        # not from when the timer heap got to it.
        self.server.timers.call_later(due + self.server.ping_timeout - time.monotonic(), self._pong_overdue,
                                      self._ping_seq)

    def _pong_overdue(self, seq: int) -> None:
        if seq == self._ping_seq and self.last_ping and not (self.closing or self.closed):
            log.debug("%s: no pong within the ping timeout, closing", self.sid)
            # Not here: the close runs the disconnect handlers, and a timer never waits on them.
            self._later(self._ping_timed_out, seq)

    def _ping_timed_out(self, seq: int) -> None:
        if seq == self._ping_seq and self.last_ping and not (self.closing or self.closed):
            self.close(wait=False, abort=False, reason=self.server.reason.PING_TIMEOUT)

    # --- sending

    #: bytes queued for a polling client that has not fetched them yet
    queued_bytes = 0
    #: cut off for not fetching them (nothing more is queued)
    _cut = False

    # internal: engineio.socket.Socket.send
    def send(self, pkt: eio_packet.Packet) -> None:
        """Send a packet: straight to the WebSocket, or into the polling queue (bounded)."""
        ws = self.ws
        if ws is None or self.upgrading:  # type: ignore[has-type]
            if self.closed or self._cut:
                return  # (closing still sends its CLOSE packet: python-engineio's close does)
            self.queued_bytes += _size(pkt)
            if self.queued_bytes > Connection.max_buffer:
                # The bound of a WebSocket's send buffer, for polling too: a client that
                # answers pings and never fetches would hold every event (issue 17).
                log.warning("closing a polling session that does not fetch: %d bytes queued", self.queued_bytes)
                if Connection.on_slow_consumer is not None:
                    Connection.on_slow_consumer()
                self._cut = True
                self._later(self._slow_close)
                return
            super().send(pkt)
            return
        if self.closed:
            return
        encoded = pkt.encode()
        if isinstance(encoded, str):
            ws.send_frame_bytes(encode_frame(encoded.encode("utf-8")))
        else:
            ws.send(encoded)

    # --- polling

    # internal: engineio.socket.Socket.poll
    def poll(self) -> list[eio_packet.Packet]:
        if self.polling_now:
            # Two GETs at once: refuse this one and end the session; the
            # pending GET receives the CLOSE packet.
            self.close(wait=False, abort=False, reason=self.server.reason.TRANSPORT_ERROR)
            raise ProtocolViolation("duplicate GET on a polling session")
        self.polling_now = True
        try:
            packets: list[eio_packet.Packet] = super().poll()
            self.queued_bytes = max(0, self.queued_bytes - sum(_size(p) for p in packets))
            return packets
        finally:
            self.polling_now = False

    def _slow_close(self) -> None:
        self.close(wait=False, abort=True, reason=self.server.reason.TRANSPORT_ERROR)

    # internal: engineio.socket.Socket.handle_post_request
    def handle_post_request(self, environ: dict[str, Any]) -> None:
        """Receive the packets of a polling POST.

        :raise ProtocolViolation: too large, undecodable, or a packet a client may not send
        """
        length = environ.get("CONTENT_LENGTH") or ""
        if not length.isdigit():
            raise ProtocolViolation("a polling POST needs a Content-Length")
        if int(length) > self.server.max_http_buffer_size:
            raise ProtocolViolation("payload over ORGCAST_MAX_PAYLOAD")
        try:
            raw = environ["wsgi.input"].read(int(length))
        except OSError:  # the client went away, or ORGCAST_BODY_TIMEOUT cut it off
            raw = b""
        if len(raw) != int(length):
            raise ProtocolViolation("the body ended early")
        try:
            body = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolViolation("payload is not UTF-8") from None
        for pkt in decode_payload(body):
            self._check_receivable(pkt)
            # In the session's greenlet, after what is already waiting: two POSTs at once
            # (two CONNECTs) raced each other into a 500 (issue 18).
            self._later(self._receive_in_order, pkt)

    def _check_receivable(self, pkt: eio_packet.Packet) -> None:
        if pkt.packet_type in (eio_packet.PING, eio_packet.UPGRADE) and not self.upgrading:
            raise ProtocolViolation(f"unexpected packet type {pkt.packet_type}")

    def _receive_in_order(self, pkt: eio_packet.Packet) -> None:
        if self.closed:
            return
        try:
            self.receive(pkt)
        except ProtocolViolation as exc:
            log.info("closing Engine.IO session: %s", exc)
            self.close(wait=False, abort=True, reason=self.server.reason.TRANSPORT_ERROR)

    # internal: engineio.socket.Socket.receive
    def receive(self, pkt: eio_packet.Packet) -> None:
        if pkt.packet_type == eio_packet.MESSAGE or pkt.packet_type in (
                eio_packet.PONG, eio_packet.CLOSE):
            super().receive(pkt)
        elif pkt.packet_type == eio_packet.UPGRADE and self.upgrading:
            return  # the websocket handler waits for it itself
        else:
            # PING from a client (only "probe" during an upgrade, handled
            # there) and UPGRADE outside an upgrade are not Engine.IO 4.
            raise ProtocolViolation(f"unexpected packet type {pkt.packet_type}")

    # internal: engineio.socket.Socket.close
    def close(self, wait: bool = True, abort: bool = False, reason: Any = None) -> None:
        if self.closed or self.closing:
            return
        if abort and self.ws is None and self.polling_now:
            # The client closed: end its pending GET cleanly (NOOP).
            self.queue.put(eio_packet.Packet(eio_packet.NOOP))
        # A websocket session has nothing in the queue to wait for.
        super().close(wait=wait and self.ws is None, abort=abort, reason=reason)
        if self.ws is not None:
            self.ws.close()
        if self.server.sockets.get(self.sid) is self:
            del self.server.sockets[self.sid]

    # --- websocket

    # internal: engineio.socket.Socket._upgrade_websocket
    def _upgrade_websocket(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        accept = environ.get(ACCEPT_KEY)
        if accept is None or self.upgraded:
            return self.server._bad_request("This request cannot become a WebSocket.")
        ws: WebSocket = accept()
        self._run_websocket(ws)
        return []

    def _run_websocket(self, ws: WebSocket) -> None:
        if self.connected:  # type: ignore[has-type]
            # An upgrade from polling: probe, then UPGRADE (Engine.IO 4 "upgrade").
            self.upgrading = True
            try:
                if not self._expect(ws, eio_packet.PING, "probe"):
                    return
                ws.send("3probe")
                # ends the pending GET
                self.queue.put(eio_packet.Packet(eio_packet.NOOP))  # type: ignore[has-type]
                if not self._expect(ws, eio_packet.UPGRADE, ""):
                    return
            finally:
                self.upgrading = False
        else:
            self.connected = True
        self.upgraded = True
        self.ws = ws
        ws.on_close = self._ws_closed
        self._drain_queue_to(ws)
        # Nothing is queued for a WebSocket session any more (a gevent
        # JoinableQueue is 3.7 KiB an idle socket would keep).
        self.queue = NO_QUEUE
        self.queued_bytes = 0
        if ws.adopt(self._ws_message):
            return  # this request's greenlet ends; the socket's watcher reads from now on
        while not self.closed:
            message = ws.receive()
            if message is None:
                break
            self._handle_ws_message(message)
        self.close(wait=False, abort=True, reason=self.server.reason.TRANSPORT_CLOSE)

    def _ws_message(self, message: Any) -> None:
        """A message from the WebSocket, in the hub: a pong here, the rest in order in a greenlet."""
        if message == "3":
            self.receive(eio_packet.Packet(eio_packet.PONG))
        else:
            self._later(self._handle_ws_message, message)

    def _handle_ws_message(self, message: Any) -> None:
        if self.closed:
            return
        try:
            self.receive(decode_packet(message))
        except ProtocolViolation as exc:
            log.info("closing Engine.IO session: %s", exc)
            self.close(wait=False, abort=True, reason=self.server.reason.TRANSPORT_ERROR)

    def _later(self, call: Any, *args: Any) -> None:
        """Run ``call(*args)`` in this session's greenlet, after what is already waiting.

        The greenlet exists only while there is something to run: what a
        client sends is handled in order, and may wait for the database.
        """
        if self._pending is None:
            self._pending = deque()
        self._pending.append((call, args))
        if self._runner is None:
            self._runner = gevent.spawn(self._run_pending)

    def _run_pending(self) -> None:
        try:
            while self._pending:
                call, args = self._pending.popleft()
                try:
                    call(*args)
                except Exception:
                    log.exception("handling a message of an Engine.IO session failed")
        finally:
            self._runner = None
            self._pending = None

    def _expect(self, ws: WebSocket, kind: int, data: str) -> bool:
        message = ws.receive()
        try:
            ok = message is not None and (pkt := decode_packet(message)).packet_type == kind \
                and pkt.data == data
        except ProtocolViolation:
            ok = False
        if not ok:
            log.info("failed websocket upgrade: expected packet type %d", kind)
            ws.close()
        return ok

    def _drain_queue_to(self, ws: WebSocket) -> None:
        # Packets queued before the websocket took over (the OPEN packet of a
        # fresh websocket session, or what was sent during an upgrade).
        empty = self.server.get_queue_empty_exception()
        while True:
            try:
                pkt = self.queue.get(block=False)
            except empty:
                return
            self.queue.task_done()
            if pkt is not None and pkt.packet_type != eio_packet.NOOP:
                encoded = pkt.encode()
                ws.send(encoded)

    def _ws_closed(self, code: int) -> None:
        # Maybe in the hub (the peer left): the disconnect handlers run in a greenlet.
        if not self.closed:
            self._later(self._transport_closed)

    def _transport_closed(self) -> None:
        if not self.closed:
            self.close(wait=False, abort=True, reason=self.server.reason.TRANSPORT_CLOSE)


class EngineServer(engineio.Server):  # type: ignore[misc]
    """python-engineio's server with the request handling described above."""

    #: the process's timer heap (set by transport/server.py)
    timers: Timers
    sequence_number: int

    # internal: engineio.server.Server.generate_id
    def generate_id(self) -> str:
        """A session id exactly as python-engineio makes one (12 random bytes and a
        sequence number, base64), with the random bytes read ahead (app/process.py):
        two getrandom calls per connect were ~4 % of its CPU in the connect profile."""
        sid = base64.b64encode(process.random_bytes(12) + self.sequence_number.to_bytes(3, "big"))
        self.sequence_number = (self.sequence_number + 1) & 0xFFFFFF
        return sid.decode("ascii").replace("/", "_").replace("+", "-")

    # internal: engineio.server.Server._bad_request
    def _bad_request(self, message: str | None = None) -> dict[str, Any]:
        return _json_response(400, "bad_request", message or "Bad request.")

    def _forbidden(self, message: str) -> dict[str, Any]:
        return _json_response(403, "origin_not_allowed", message)

    # internal: engineio.server.Server._ok
    def _ok(self, packets: list[eio_packet.Packet] | None = None, headers: list[Any] | None = None,
            jsonp_index: int | None = None) -> dict[str, Any]:
        if packets is None:
            # Engine.IO 4: a successful POST answers "ok".
            return {"status": "200 OK", "headers": [("Content-Type", "text/html")], "response": b"ok"}
        result: dict[str, Any] = super()._ok(packets, headers=headers)
        return result

    # internal: engineio.server.Server.handle_request
    def handle_request(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        """Answer one Engine.IO HTTP request (python-engineio 4.15's, made strict)."""
        response = self._route(environ, start_response)
        if not isinstance(response, dict):
            return response  # a websocket session that has ended
        # internal: engineio.Server._cors_headers
        headers = response["headers"] + self._cors_headers(environ)
        body = response["response"]
        if self.http_compression and len(body) >= self.compression_threshold:
            accepted = [e.split(";")[0].strip() for e in environ.get("HTTP_ACCEPT_ENCODING", "").split(",")]
            for encoding in self.compression_methods:
                if encoding in accepted:
                    body = getattr(self, "_" + encoding)(body)
                    headers = headers + [("Content-Encoding", encoding)]
                    break
        start_response(response["status"], headers + [("Content-Length", str(len(body)))])
        return [body]

    def _route(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        origin = environ.get("HTTP_ORIGIN")
        if origin and self.cors_allowed_origins != []:
            # internal: engineio.Server._cors_allowed_origins
            allowed = self._cors_allowed_origins(environ)
            if allowed is not None and origin not in allowed:
                return self._forbidden("This Origin is not allowed: list it in ORGCAST_CORS_ORIGINS.")
        method = environ["REQUEST_METHOD"]
        if method == "OPTIONS":
            return self._ok()
        if method not in ("GET", "POST"):
            return self._bad_request(f"Method {method[:16]} is not allowed on the Engine.IO path.")
        query = parse_qs(environ.get("QUERY_STRING", ""))
        transport = query.get("transport", [None])[0]
        if transport is None:
            return self._bad_request("The transport query parameter is missing.")
        if transport not in self.transports:
            return self._bad_request("Unknown or disabled transport.")
        if "j" in query:
            return self._bad_request("JSONP polling is not supported.")
        sid = query.get("sid", [None])[0]
        if sid is None:
            return self._open(environ, start_response, method, query, transport)
        socket = self.sockets.get(sid)
        if not isinstance(socket, EngineSocket) or socket.closed:  # (a Server-Sent Events stream is none)
            if socket is None or socket.closed:
                self.sockets.pop(sid, None)
            return self._bad_request("Unknown or closed session.")
        if not socket.check_ping_timeout():
            # Overdue: its pong never came (the service task may not have seen it yet).
            self.sockets.pop(sid, None)
            return self._bad_request("Unknown or closed session.")
        accept = environ.get(ACCEPT_KEY)
        if (socket.upgraded or socket.upgrading) and transport == "websocket" and accept is not None:
            # As Node's engine.io (and its protocol suite) do: accept this
            # second WebSocket and close it; the session keeps its first.
            accept().close()
            return []
        if socket.upgraded:
            return self._bad_request("This session has already been upgraded to WebSocket.")
        if not socket.connected:
            return self._bad_request("This session is not connected yet.")
        upgrade = environ.get("HTTP_UPGRADE", "").lower()
        if transport != "polling" and transport != upgrade:
            return self._bad_request("The transport does not match the request.")
        try:
            if method == "GET":
                result = socket.handle_get_request(environ, start_response)
                response = self._ok(result) if isinstance(result, list) else result
            elif transport != "polling":
                return self._bad_request("Only polling sessions accept a POST.")
            else:
                socket.handle_post_request(environ)
                response = self._ok()
        except ProtocolViolation as exc:
            log.info("closing Engine.IO session: %s", exc)
            self._end(sid)
            return self._bad_request(_protocol_message(exc))
        except eio_exceptions.EngineIOError:
            self._end(sid)
            return self._bad_request("The session has ended.")
        if socket.closed:
            self.sockets.pop(sid, None)
        return response

    def _open(self, environ: dict[str, Any], start_response: Callable[..., Any], method: str,
              query: dict[str, list[str]], transport: str) -> Any:
        if query.get("EIO") != ["4"]:
            return self._bad_request("Unsupported protocol version: Socket.IO 3/4 clients (EIO=4) only.")
        if method != "GET":
            return self._bad_request("A session opens with a GET.")
        if transport == "websocket" and environ.get("HTTP_UPGRADE", "").lower() != "websocket":
            return self._bad_request("transport=websocket needs a WebSocket upgrade request.")
        return self._handle_connect(environ, start_response, transport)

    # internal: engineio.server.Server._handle_connect
    def _handle_connect(self, environ: dict[str, Any], start_response: Callable[..., Any],
                        transport: str, jsonp_index: int | None = None) -> Any:
        """Open a session (python-engineio's, with our socket class and exact timings)."""
        sid = self.generate_id()
        s = EngineSocket(self, sid)
        self.sockets[sid] = s
        s.send(eio_packet.Packet(eio_packet.OPEN, {
            "sid": sid,
            # internal: engineio.Server._upgrades
            "upgrades": self._upgrades(sid, transport),
            "pingTimeout": round(self.ping_timeout * 1000),
            "pingInterval": round((self.ping_interval + self.ping_interval_grace_period) * 1000),
            "maxPayload": self.max_http_buffer_size,
        }))
        # internal: engineio.Server._trigger_event
        accepted = self._trigger_event("connect", sid, environ, run_async=False)
        if accepted is not None and accepted is not True:
            del self.sockets[sid]
            return _json_response(429, "rate_limited", "Too many connections from this address are not "
                                  "admitted yet; retry later.")
        s.schedule_ping()
        if transport == "websocket":
            result = s.handle_get_request(environ, start_response)
            if s.closed:
                self.sockets.pop(sid, None)
            return result
        s.connected = True
        try:
            return self._ok(s.poll())
        except eio_exceptions.QueueEmpty:
            return self._bad_request("The session has ended.")

    def _end(self, sid: str) -> None:
        socket = self.sockets.pop(sid, None)
        if socket is not None:
            socket.close(wait=False, abort=False, reason=self.reason.TRANSPORT_ERROR)

    # internal: engineio.server.Server.disconnect
    def disconnect(self, sid: str | None = None) -> None:
        """Close one session (or all), never waiting for a client to drain it."""
        sids = [sid] if sid is not None else list(self.sockets)
        for one in sids:
            socket = self.sockets.pop(one, None)
            if socket is not None:
                socket.close(wait=False, reason=self.reason.SERVER_DISCONNECT)


def _size(pkt: eio_packet.Packet) -> int:
    """About the bytes a packet takes on the wire."""
    data = pkt.data
    return len(data) + 1 if isinstance(data, str | bytes) else 64


def _protocol_message(exc: ProtocolViolation) -> str:
    return f"Engine.IO protocol error: {exc}; the session is closed."


def _json_response(status: int, code: str, message: str) -> dict[str, Any]:
    """An engineio response dict carrying orgcast's JSON error body."""
    status_line, body = http_error(status, code, message)
    return {"status": status_line, "headers": [("Content-Type", "application/json")],
            "response": json.dumps(body).encode()}
