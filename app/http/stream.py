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

The stream's request keeps its greenlet while it lasts (gevent's pywsgi
writes what the response iterator yields): a stream costs more memory than
an idle WebSocket (bench/README.md).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import parse_qs

import gevent
import gevent.queue
import socketio

from app.errors import REFUSALS, http_error

log = logging.getLogger(__name__)

PATH = "/api/v1/stream"
#: HTTP status of each refusal before a stream starts (contract §4.2)
STATUS = {"token_missing": 401, "token_invalid": 401, "token_expired": 401, "forbidden": 403,
          "organization_invalid": 422, "organization_missing": 422, "rewind_invalid": 422, "rate_limited": 429,
          "too_many_sockets": 429, "unavailable": 503}

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class StreamSocket:
    """One Server-Sent Events stream, as an Engine.IO session of its own kind."""

    ws = None
    upgrading = False

    def __init__(self, sid: str, max_buffer: int, offsets: bool) -> None:
        self.sid = sid
        self.closed = False
        self.closing = False
        self.gate: Any = None
        self._offsets = offsets
        self._max = max_buffer
        self.queued_bytes = 0
        self.queue: gevent.queue.Queue[bytes | None] = gevent.queue.Queue()

    # --- what fan-out and python-socketio call

    def send(self, pkt: Any) -> None:
        data = pkt.data
        if self.closed or not isinstance(data, str):
            return
        if data.startswith("1"):  # Socket.IO DISCONNECT of "/": the server ended this socket
            self.close()
            return
        if not data.startswith("2"):
            return
        try:
            args = json.loads(data[1:])
        except ValueError:
            return
        if not isinstance(args, list) or not args:
            return
        position = None
        if self._offsets and len(args) >= 3 and isinstance(args[-1], str) and args[-1].isdigit():
            position, args = args[-1], args[:-1]
        values = args[1:]
        value = values[0] if len(values) == 1 else values
        self._put(_event(str(args[0]), value, position))

    def resync(self) -> None:
        self._put(_event("resync", {}, None))

    def _put(self, chunk: bytes) -> None:
        self.queued_bytes += len(chunk)
        if self.queued_bytes > self._max:
            log.warning("closing an event stream that does not read: %d bytes queued", self.queued_bytes)
            self.close()
            return
        self.queue.put(chunk)

    def close(self, wait: bool = False, abort: bool = False, reason: Any = None) -> None:
        if not self.closed:
            self.closed = True
            self.queue.put(None)

    def check_ping_timeout(self) -> bool:
        return True

    def _later(self, call: Any, *args: Any) -> None:
        gevent.spawn(call, *args)

    # --- what the response writes

    def chunks(self, heartbeat: float, done: Callable[[], None]) -> Iterator[bytes]:
        try:
            yield b": orgcast\nretry: 1000\n\n"  # (EventSource reconnects a second after a drop)
            while True:
                try:
                    chunk = self.queue.get(timeout=heartbeat)
                except gevent.queue.Empty:
                    yield b": ping\n\n"
                    continue
                if chunk is None:
                    return
                self.queued_bytes -= len(chunk)
                yield chunk
        finally:
            self.closed = True
            done()


def _event(name: str, value: Any, position: str | None) -> bytes:
    lines = [f"id: {position}"] if position is not None else []
    lines.append(f"event: {name.replace(chr(10), ' ').replace(chr(13), ' ')}")
    lines.append("data: " + json.dumps(value, separators=(",", ":"), ensure_ascii=True))
    return ("\n".join(lines) + "\n\n").encode()


class EventStreams:
    """The ``/api/v1/stream`` route, in front of ``app``."""

    def __init__(self, sio: Any, app: WSGIApp, *, heartbeat: float, max_buffer: int, offsets: bool,
                 address_of: Callable[[dict[str, Any]], str]) -> None:
        self._sio = sio
        self._app = app
        self._heartbeat = heartbeat
        self._max = max_buffer
        self._offsets = offsets
        self._address_of = address_of

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != PATH:
            return self._app(environ, start_response)
        if environ.get("REQUEST_METHOD") != "GET":
            return _json(start_response, 405, "method_not_allowed", None, [("Allow", "GET")])
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
        stream = StreamSocket(self._sio.eio.generate_id(), self._max, self._offsets)
        try:
            # (A resume asks the database past the auth cache, as a recovery does.)
            admission = namespace.admission(check, auth or None, stream.sid, fresh=resume is not None)
        except socketio.exceptions.ConnectionRefusedError as exc:
            code = (exc.error_args.get("data") or {}).get("code", "unavailable")
            return _json(start_response, STATUS.get(code, 400), code, exc.error_args.get("message"))
        admission.resume = resume
        sid = self._sio.admit_stream(stream, admission)

        def done() -> None:
            if self._sio.eio.sockets.get(stream.sid) is stream:
                del self._sio.eio.sockets[stream.sid]
                self._sio._handle_eio_disconnect(stream.sid, "transport close")

        log.debug("event stream %s admitted as socket %s", stream.sid, sid)
        start_response("200 OK", [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache"),
                                  ("X-Accel-Buffering", "no")])
        return stream.chunks(self._heartbeat, done)


def _json(start_response: Callable[..., Any], status: int, code: str, message: str | None,
          headers: list[tuple[str, str]] | None = None) -> list[bytes]:
    line, body = http_error(status, code, message or (REFUSALS[code].message if code in REFUSALS else None))
    data = json.dumps(body).encode()
    extra = [("WWW-Authenticate", "Bearer")] if status == 401 else [("Retry-After", "1")] if status == 503 else []
    start_response(line, [("Content-Type", "application/json"), ("Content-Length", str(len(data))), *extra,
                          *(headers or [])])
    return [data]
