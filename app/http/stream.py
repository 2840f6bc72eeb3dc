"""``GET /api/v1/stream``: Server-Sent Events, a way in without Socket.IO (contract §4.2).

The same credentials (``Authorization: Bearer``, or ``?token=`` for
``EventSource``, redacted in every log like the Socket.IO query string),
the same checks and codes as a Socket.IO connect — refused before the
stream starts with a JSON error (401, 403, 422, 429, 503) — and the same
rooms. Admitted, the stream is a socket like the others
(``SocketServer.admit_stream``): fan-out writes to it through
``StreamSocket.send``, which turns each Socket.IO event into
``id: <position>`` / ``event: <name>`` / ``data: <JSON>``; kicks, revocations,
expiry and a stopping worker end it. ``Last-Event-ID`` (or ``?lastEventId=``)
resumes after that position within the recovery window, once and in order;
an older one gets ``event: resync`` first. ``?rewind=N`` as on connect. A
comment line goes out at least every ``ORGCAST_PING_INTERVAL``; a reader that
lets ``ORGCAST_SEND_BUFFER`` bytes wait is dropped, as on WebSocket.

Once its headers are out, a stream keeps no greenlet: fan-out writes its
chunks straight to the socket (``EventStream``, the same writer as an
adopted WebSocket's), a watcher in the hub notices the client leaving, and
heartbeats are entries in the worker's timer heap (bench/sse.py measures
what a stream costs beside a Socket.IO socket).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

import gevent
import socketio

from app.errors import REFUSALS, http_error
from app.transport.connection import CLOSE_NORMAL, STREAM_KEY, Connection

log = logging.getLogger(__name__)

PATH = "/api/v1/stream"
#: HTTP status of each refusal before a stream starts (contract §4.2)
STATUS = {"token_missing": 401, "token_invalid": 401, "token_expired": 401, "forbidden": 403,
          "organization_invalid": 422, "organization_missing": 422, "rewind_invalid": 422, "rate_limited": 429,
          "too_many_sockets": 429, "unavailable": 503}

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class EventStream(Connection):
    """The response of one stream once its headers are out: chunks written straight to the socket.

    Like an adopted WebSocket (``transport/connection.py``), it keeps no
    greenlet: what the client sends after its request is read and dropped
    by a watcher in the hub, and its end (or an error) ends the stream.
    """

    __slots__ = ("chunked",)
    kind = "an event stream"

    def __init__(self, sock: Any, owner: Any, chunked: bool) -> None:
        super().__init__(sock, owner)
        #: HTTP/1.1 bodies without a length are chunked (pywsgi chose it for the headers)
        self.chunked = chunked

    def write(self, data: bytes) -> bool:
        return self.send_bytes(b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data)

    def _readable(self) -> None:
        self._received()  # dropped; its end ends the stream

    def finish(self) -> None:
        """End the body (its last chunk, when nothing else waits) and close the connection."""
        if self.closed:
            return
        if self.chunked and not self.backlog:
            try:
                # internal: gevent.socket.socket._sock
                self.sock._sock.send(b"0\r\n\r\n")
            except OSError:
                pass  # gone, or not reading: nothing more to tell it
        self._shutdown(CLOSE_NORMAL)


class StreamSocket:
    """One Server-Sent Events stream, as an Engine.IO session of its own kind."""

    ws = None
    upgrading = False

    def __init__(self, sid: str, offsets: bool, timers: Any, heartbeat: float) -> None:
        self.sid = sid
        self.closed = False
        self.closing = False
        self.gate: Any = None
        self._offsets = offsets
        self._timers = timers
        self._heartbeat = heartbeat
        #: the response, once ``start`` has written its headers
        self.conn: EventStream | None = None
        #: called once when the stream has ended (``EventStreams``: the socket leaves)
        self.on_end: Callable[[], None] | None = None

    def start(self, conn: EventStream) -> None:
        self.conn = conn
        conn.on_close = self._ended
        self._timers.call_later(self._heartbeat, self._beat)

    # --- what fan-out and python-socketio call

    def send(self, pkt: Any) -> None:
        if self.closed:
            return
        # One broadcast's packet is the same object for every recipient: its
        # event is turned into SSE once (in the worker, offsets are on or off for all).
        chunk = getattr(pkt, "sse", None)
        if chunk is None:
            chunk = _chunk_of(pkt.data, self._offsets)
            try:
                pkt.sse = chunk
            except AttributeError:
                pass
        if chunk is _END:
            self.close()
        elif chunk:
            self._write(chunk)

    def resync(self) -> None:
        self._write(_event("resync", {}, None))

    def _write(self, chunk: bytes) -> None:
        conn = self.conn
        if conn is not None and not conn.write(chunk):
            self.close()

    def _beat(self) -> None:
        # (A timer callback: it writes without waiting, and re-arms.)
        if not self.closed and self.conn is not None:
            self._write(b": ping\n\n")
            self._timers.call_later(self._heartbeat, self._beat)

    def close(self, wait: bool = False, abort: bool = False, reason: Any = None) -> None:
        if not self.closed:
            self.closed = True
            if self.conn is not None:
                self.conn.finish()

    def _ended(self, code: int) -> None:
        self.closed = True
        end, self.on_end = self.on_end, None
        if end is not None:
            # (Called in the hub or in fan-out's greenlet: the disconnect handlers may wait.)
            gevent.spawn(end)

    def check_ping_timeout(self) -> bool:
        return True

    def _later(self, call: Any, *args: Any) -> None:
        gevent.spawn(call, *args)


#: what ``_chunk_of`` returns for the Socket.IO DISCONNECT of "/": the server ended the socket
_END = b"end"


def _chunk_of(data: Any, offsets: bool) -> bytes:
    """The SSE text of an Engine.IO message's Socket.IO packet (b"" for what a stream does not carry)."""
    if not isinstance(data, str):
        return b""
    if data.startswith("1"):
        return _END
    if not data.startswith("2"):
        return b""
    try:
        args = json.loads(data[1:])
    except ValueError:
        return b""
    if not isinstance(args, list) or not args:
        return b""
    position = None
    if offsets and len(args) >= 3 and isinstance(args[-1], str) and args[-1].isdigit():
        position, args = args[-1], args[:-1]
    values = args[1:]
    value = values[0] if len(values) == 1 else values
    return _event(str(args[0]), value, position)


def _event(name: str, value: Any, position: str | None) -> bytes:
    lines = [f"id: {position}"] if position is not None else []
    lines.append(f"event: {name.replace(chr(10), ' ').replace(chr(13), ' ')}")
    lines.append("data: " + json.dumps(value, separators=(",", ":"), ensure_ascii=True))
    return ("\n".join(lines) + "\n\n").encode()


class EventStreams:
    """The ``/api/v1/stream`` route, in front of ``app``."""

    def __init__(self, sio: Any, app: WSGIApp, *, heartbeat: float, offsets: bool,
                 address_of: Callable[[dict[str, Any]], str]) -> None:
        self._sio = sio
        self._app = app
        self._heartbeat = heartbeat
        self._offsets = offsets
        self._address_of = address_of

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != PATH:
            return self._app(environ, start_response)
        if environ.get("REQUEST_METHOD") != "GET":
            return _json(start_response, 405, "method_not_allowed", None, [("Allow", "GET")])
        accept = environ.get(STREAM_KEY)
        if accept is None:  # not under orgcast's worker (gunicorn.conf.py's worker_class)
            return _json(start_response, 503, "unavailable", "Event streams need orgcast's gunicorn worker.")
        query = parse_qs(environ.get("QUERY_STRING", ""))
        auth: dict[str, Any] = {}
        rewind = query.get("rewind", [None])[0]
        if rewind is not None:
            auth["rewind"] = int(rewind) if rewind.isdigit() else rewind
        last = environ.get("HTTP_LAST_EVENT_ID") or query.get("lastEventId", [""])[0]
        resume = int(last) if last.isdigit() and len(last) <= 20 else None
        namespace = self._sio.namespace_handlers["/"]
        check = {"QUERY_STRING": environ.get("QUERY_STRING", ""), "HTTP_AUTHORIZATION":
                 environ.get("HTTP_AUTHORIZATION", ""), "REMOTE_ADDR": environ.get("REMOTE_ADDR", ""),
                 "orgcast.address": self._address_of(environ)}
        stream = StreamSocket(self._sio.eio.generate_id(), self._offsets, self._sio.eio.timers, self._heartbeat)
        try:
            # (A resume asks the database past the auth cache, as a recovery does.)
            admission = namespace.admission(check, auth or None, stream.sid, fresh=resume is not None)
        except socketio.exceptions.ConnectionRefusedError as exc:
            code = (exc.error_args.get("data") or {}).get("code", "unavailable")
            return _json(start_response, STATUS.get(code, 400), code, exc.error_args.get("message"))
        admission.resume = resume
        # The headers and a first comment go out now; from here on the stream is
        # written to directly, and this request's greenlet ends (``EventStream``).
        conn: EventStream = accept("200 OK", [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache"),
                                              ("X-Accel-Buffering", "no")],
                                   b": orgcast\nretry: 1000\n\n",  # (EventSource retries a second after a drop)
                                   EventStream)
        stream.start(conn)
        conn.adopt()

        def done() -> None:
            if self._sio.eio.sockets.get(stream.sid) is stream:
                del self._sio.eio.sockets[stream.sid]
                self._sio._handle_eio_disconnect(stream.sid, "transport close")

        stream.on_end = done
        try:
            sid = self._sio.admit_stream(stream, admission)
        except Exception:
            log.exception("admitting an event stream failed")
            stream.close()
            return []
        log.debug("event stream %s admitted as socket %s", stream.sid, sid)
        return []


def _json(start_response: Callable[..., Any], status: int, code: str, message: str | None,
          headers: list[tuple[str, str]] | None = None) -> list[bytes]:
    line, body = http_error(status, code, message or (REFUSALS[code].message if code in REFUSALS else None))
    data = json.dumps(body).encode()
    extra = [("WWW-Authenticate", "Bearer")] if status == 401 else [("Retry-After", "1")] if status == 503 else []
    start_response(line, [("Content-Type", "application/json"), ("Content-Length", str(len(data))), *extra,
                          *(headers or [])])
    return [data]
