"""gunicorn integration: the worker class and the access logger.

Why a worker of our own instead of ``geventwebsocket.gunicorn.workers.
GeventWebSocketWorker`` as it is:

- its handler replaces gunicorn's access log with gevent-websocket's own
  request logger, which writes the whole request line, ``?token=`` included;
  ours logs through gunicorn's access logger, which redacts;
- gevent-websocket reads a frame's whole payload, whatever length the header
  announces; ours refuses a frame or message over ``ORGCAST_MAX_PAYLOAD``
  before reading it (close code 1009), so a client cannot make the server
  allocate without bound;
- gevent's handler writes malformed request lines to stderr as they came;
  ours logs them through gunicorn, redacted;
- gevent-websocket's close() drops the close code; ours sends it.

Besides gevent, gevent-websocket and gunicorn, this module imports only
orgcast's leaf modules (config, log): gunicorn loads it in the master,
before gevent patches the worker.
"""

from __future__ import annotations

import struct
import time
from datetime import timedelta
from typing import Any

from geventwebsocket.exceptions import ProtocolError, WebSocketError
from geventwebsocket.handler import WebSocketHandler
from geventwebsocket.websocket import Header, WebSocket
from gunicorn.glogging import Logger
from gunicorn.workers.ggevent import GeventPyWSGIWorker, GeventResponse, PyWSGIHandler

from app.config import load_settings
from app.log import make_formatter, redact, setup_logging


class MessageTooBig(Exception):
    """A frame or message is larger than the configured maximum."""


class BoundedWebSocket(WebSocket):  # type: ignore[misc]
    """gevent-websocket's WebSocket with a size cap checked before reading."""

    __slots__ = ()
    #: set from ORGCAST_MAX_PAYLOAD when the worker starts
    max_message: int = 1048576

    def read_frame(self) -> tuple[Any, bytes]:
        header = Header.decode_header(self.stream)
        if header.flags:
            raise ProtocolError("reserved bits set")
        if header.length > self.max_message:
            raise MessageTooBig(f"frame of {header.length} bytes")
        if not header.length:
            return header, b""
        payload = self.raw_read(header.length)
        if len(payload) != header.length:
            raise ProtocolError("unexpected EOF reading frame payload")
        if header.mask:
            payload = header.unmask_payload(payload)
        return header, payload

    def read_message(self) -> Any:
        # gevent-websocket's read_message, with the running total of a
        # fragmented message capped too (its version has no limit at all).
        opcode = None
        message = bytearray()
        while True:
            header, payload = self.read_frame()
            f_opcode = header.opcode
            if f_opcode in (self.OPCODE_TEXT, self.OPCODE_BINARY):
                if opcode:
                    raise ProtocolError("new message inside a fragmented one")
                self.utf8validator.reset()
                self.utf8validate_last = (True, True, 0, 0)  # type: ignore[misc]
                opcode = f_opcode
            elif f_opcode == self.OPCODE_CONTINUATION:
                if not opcode:
                    raise ProtocolError("continuation frame without a message")
            elif f_opcode == self.OPCODE_PING:
                self.handle_ping(header, payload)
                continue
            elif f_opcode == self.OPCODE_PONG:
                continue
            elif f_opcode == self.OPCODE_CLOSE:
                self.handle_close(header, payload)
                return None
            else:
                raise ProtocolError(f"unexpected opcode {f_opcode!r}")
            if opcode == self.OPCODE_TEXT:
                self.validate_utf8(payload)
            if len(message) + len(payload) > self.max_message:
                raise MessageTooBig(f"message over {self.max_message} bytes")
            message += payload
            if header.fin:
                break
        if opcode == self.OPCODE_TEXT:
            self.validate_utf8(message)
            return self._decode_bytes(message)
        return message

    def receive(self) -> Any:
        try:
            return super().receive()
        except MessageTooBig:
            self.close(1009, b"message too big")
            return None

    def close(self, code: int = 1000, message: Any = b"") -> None:
        # gevent-websocket's close() drops the code and sends str(message) as
        # the payload: b"message too big" went out as "b'message too big'",
        # which clients read as close code 25127.
        if self.closed:
            return
        reason = message.encode() if isinstance(message, str) else bytes(message or b"")
        try:
            self.send_frame(struct.pack("!H", code) + reason[:123], opcode=self.OPCODE_CLOSE)
        except WebSocketError:
            pass  # the peer is gone: nothing to tell it
        finally:
            # What gevent-websocket's close() releases (setattr: its slots, not ours).
            for name, value in (("closed", True), ("stream", None), ("raw_write", None),
                                ("raw_read", None), ("environ", None)):
                setattr(self, name, value)


class OrgcastHandler(WebSocketHandler, PyWSGIHandler):  # type: ignore[misc]
    """gevent-websocket's handler, logging through gunicorn with redaction."""

    #: set from ORGCAST_HEADER_TIMEOUT when the worker starts
    header_timeout: float = 30.0

    def handle_one_request(self) -> Any:
        # gevent's pywsgi waits for a request line and headers for ever: a
        # client that opens connections and sends nothing (or a byte a
        # minute) would hold worker_connections slots. Bound that wait, and
        # the idle time of a kept-alive connection; read_request lifts it
        # once the headers are in, so bodies, long-polls and WebSockets run
        # without it.
        if self.socket is not None:
            self.socket.settimeout(self.header_timeout)
        return super().handle_one_request()

    def read_request(self, raw_requestline: str) -> Any:
        result = super().read_request(raw_requestline)
        self.socket.settimeout(None)
        return result

    def _handle_client_error(self, ex: BaseException) -> Any:
        if isinstance(ex, TimeoutError):
            return None  # headers never finished: close quietly, no traceback
        return super()._handle_client_error(ex)

    def upgrade_websocket(self) -> Any:
        result = super().upgrade_websocket()
        # gevent-websocket answers a bad upgrade (no key, unknown version) with
        # str chunks, which pywsgi cannot write: the client got no response
        # and the log a traceback.
        if isinstance(result, list):
            return [r.encode() if isinstance(r, str) else r for r in result]
        return result

    def upgrade_connection(self) -> Any:
        result = super().upgrade_connection()
        websocket = getattr(self, "websocket", None)
        if websocket is not None and type(websocket) is WebSocket:
            websocket.__class__ = BoundedWebSocket
        return result

    def log_request(self) -> None:
        if getattr(self, "environ", None) is not None:
            PyWSGIHandler.log_request(self)
            return
        # gevent refused the request (bad request line or headers, line too
        # long) before building an environ, and gunicorn's log_request then
        # died with a traceback instead of writing the line.
        line = str(self.requestline or "").strip()[:1024]
        method, _, rest = line.partition(" ")
        uri, _, protocol = rest.rpartition(" ") if " " in rest else (rest, "", "")
        address = self.client_address
        environ = {"REMOTE_ADDR": address[0] if isinstance(address, tuple) else str(address),
                   "REQUEST_METHOD": method or "-", "RAW_URI": uri or "-",
                   "SERVER_PROTOCOL": protocol or "-"}
        status = self.status.decode() if isinstance(self.status, bytes) else str(self.status)
        elapsed = timedelta(seconds=max(0.0, (self.time_finish or time.time()) - self.time_start))
        self.server.log.access(GeventResponse(status, [], self.response_length), [], environ,
                               elapsed)

    def log_error(self, msg: str, *args: Any) -> None:
        try:
            message = msg % args if args else msg
        except Exception:
            message = msg
        # Through gunicorn's error log (redacted, in the configured format)
        # rather than gevent's raw write to stderr.
        self.server.log.warning("%s", redact(str(message)))


class OrgcastWorker(GeventPyWSGIWorker):  # type: ignore[misc]
    """gunicorn's gevent pywsgi worker speaking WebSocket through OrgcastHandler."""

    wsgi_handler = OrgcastHandler

    def init_process(self) -> None:
        # gunicorn.conf.py validated the settings before any worker started.
        settings = load_settings()
        BoundedWebSocket.max_message = settings.max_payload
        OrgcastHandler.header_timeout = settings.header_timeout
        super().init_process()


class RedactingLogger(Logger):  # type: ignore[misc]
    """gunicorn's logger with every access-log atom and log line redacted."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        settings = load_settings()
        for logger in (self.error_log, self.access_log):
            for handler in logger.handlers:
                handler.setFormatter(make_formatter("json") if settings.log_format == "json"
                                     else _wrap(handler.formatter))
        setup_logging(settings.log_level, settings.log_format)

    def atoms(self, resp: Any, req: Any, environ: Any, request_time: Any) -> dict[str, Any]:
        atoms: dict[str, Any] = super().atoms(resp, req, environ, request_time)
        for key, value in atoms.items():
            if isinstance(value, str):
                atoms[key] = redact(value)
        return atoms


def _wrap(formatter: Any) -> Any:
    """Keep gunicorn's format, redact its output."""
    redacting = make_formatter("text")
    if formatter is not None:
        redacting._fmt = formatter._fmt
        redacting._style = formatter._style
        redacting.datefmt = formatter.datefmt
    return redacting
