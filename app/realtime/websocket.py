"""The WebSocket transport: handshake, frame reading with limits, direct writes.

A fork of gevent-websocket 0.10.1 (``geventwebsocket/websocket.py`` and the
handshake half of ``geventwebsocket/handler.py``); what it changes and why:

- **The upgrade happens when Engine.IO accepts the request**, not before
  the application runs: gevent-websocket answers ``101`` first and lets the
  application look afterwards, so a request Engine.IO refuses (bad Origin,
  ``EIO``, ``transport`` or ``sid``) was upgraded and then closed with 1000,
  and the official client waited 20 s for a timeout instead of seeing the
  HTTP error. Here the handler only checks the handshake headers and leaves
  ``accept`` in the environ; Engine.IO calls it once it has said yes.
- **Sizes are capped from the header, before reading**: a frame, or a
  fragmented message, over ``max_message`` bytes is refused with close code
  1009 (gevent-websocket reads whatever length a header announces).
- **Closing closes**: ``close()`` sends the close code it is given
  (gevent-websocket's drops it) and shuts the TCP connection down, so the
  greenlet reading it wakes at once and the connection's slot is freed
  (gevent-websocket left the reader blocked until the peer spoke again).
- **Writes go straight to the socket** (``send_frame_bytes``): one
  non-blocking ``send`` of bytes built once, with no lock, no ``sendall``
  and no ``getsockopt`` per write; only what the kernel does not take at once
  is kept, up to ``max_buffer`` bytes, and flushed by a greenlet that
  exists only while something is waiting. Past the bound the peer is cut off
  (close code 1008): a client that stops reading holds at most that much.
- Unmasking is done on whole integers instead of byte by byte in Python.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import socket
import struct
from collections import deque
from collections.abc import Callable
from typing import Any

import gevent
from gevent.socket import wait_write
from geventwebsocket.exceptions import ProtocolError, WebSocketError
from geventwebsocket.websocket import Header, WebSocket

log = logging.getLogger(__name__)

#: environ key under which the handler leaves ``accept()`` for Engine.IO
ACCEPT_KEY = "orgcast.websocket.accept"

SUPPORTED_VERSIONS = ("13", "8", "7")
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OPCODE_TEXT = 0x01
OPCODE_BINARY = 0x02
OPCODE_CLOSE = 0x08
OPCODE_PING = 0x09
OPCODE_PONG = 0x0A

#: close codes (RFC 6455 section 7.4.1)
CLOSE_NORMAL = 1000
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_INVALID_DATA = 1007
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009


class MessageTooBig(Exception):
    """A frame or message is larger than the configured maximum."""


def is_upgrade_request(environ: dict[str, Any]) -> bool:
    """Tell whether the request asks to become a WebSocket."""
    return (environ.get("HTTP_UPGRADE", "").lower() == "websocket"
            and "upgrade" in environ.get("HTTP_CONNECTION", "").lower())


def handshake_problem(environ: dict[str, Any]) -> str | None:
    """Return why the upgrade request cannot be accepted, or None when it can."""
    if environ.get("REQUEST_METHOD") != "GET":
        return "A WebSocket upgrade must be a GET request."
    if environ.get("SERVER_PROTOCOL") != "HTTP/1.1":
        return "A WebSocket upgrade needs HTTP/1.1."
    if environ.get("HTTP_SEC_WEBSOCKET_VERSION") not in SUPPORTED_VERSIONS:
        return "Unsupported Sec-WebSocket-Version (13 is supported)."
    key = environ.get("HTTP_SEC_WEBSOCKET_KEY", "").strip()
    try:
        valid = len(base64.b64decode(key, validate=True)) == 16
    except ValueError:
        valid = False
    if not valid:
        return "Sec-WebSocket-Key is missing or invalid."
    return None


def accept_headers(environ: dict[str, Any]) -> list[tuple[str, str]]:
    """Return the headers of the ``101 Switching Protocols`` answer."""
    key = environ["HTTP_SEC_WEBSOCKET_KEY"].strip().encode("latin-1")
    accept = base64.b64encode(hashlib.sha1(key + _GUID).digest()).decode("latin-1")
    return [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Accept", accept)]


def encode_frame(payload: bytes, opcode: int = OPCODE_TEXT) -> bytes:
    """Return one unmasked, final server frame carrying ``payload``.

    Server frames are never masked, so the frame of a broadcast is the same
    bytes for every recipient: build it once, write it N times.
    """
    length = len(payload)
    if length < 126:
        return struct.pack("!BB", 0x80 | opcode, length) + payload
    if length <= 0xFFFF:
        return struct.pack("!BBH", 0x80 | opcode, 126, length) + payload
    return struct.pack("!BBQ", 0x80 | opcode, 127, length) + payload


def _unmask(payload: bytes, mask: bytes) -> bytes:
    length = len(payload)
    key = (mask * (length // 4 + 1))[:length]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(length, "big")


class BoundedWebSocket(WebSocket):  # type: ignore[misc]
    """gevent-websocket's WebSocket with size caps, a real close and direct writes."""

    __slots__ = ("sock", "backlog", "backlog_bytes", "flusher", "on_close")

    #: set from ORGCAST_MAX_PAYLOAD when the worker starts
    max_message: int = 1048576
    #: set from ORGCAST_SEND_BUFFER when the worker starts
    max_buffer: int = 4 * 1048576
    #: seconds the flusher waits for a peer to take more bytes before giving up
    write_timeout: float = 30.0

    def __init__(self, environ: dict[str, Any], stream: Any, handler: Any) -> None:
        super().__init__(environ, stream, handler)
        self.sock = handler.socket
        self.backlog: deque[bytes] = deque()
        self.backlog_bytes = 0
        self.flusher: Any = None
        #: called once, with the close code, when the connection is closed
        self.on_close: Callable[[int], None] | None = None

    # --- reading

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
            payload = _unmask(payload, header.mask)
        return header, payload

    def read_message(self) -> Any:
        # gevent-websocket's read_message, with the running total of a
        # fragmented message capped too (its version has no limit at all).
        opcode = None
        message = bytearray()
        while True:
            header, payload = self.read_frame()
            f_opcode = header.opcode
            if f_opcode in (OPCODE_TEXT, OPCODE_BINARY):
                if opcode:
                    raise ProtocolError("new message inside a fragmented one")
                opcode = f_opcode
            elif f_opcode == self.OPCODE_CONTINUATION:
                if not opcode:
                    raise ProtocolError("continuation frame without a message")
            elif f_opcode == OPCODE_PING:
                self.send_frame_bytes(encode_frame(payload, OPCODE_PONG))
                continue
            elif f_opcode == OPCODE_PONG:
                continue
            elif f_opcode == OPCODE_CLOSE:
                self.handle_close(header, payload)
                return None
            else:
                raise ProtocolError(f"unexpected opcode {f_opcode!r}")
            if len(message) + len(payload) > self.max_message:
                raise MessageTooBig(f"message over {self.max_message} bytes")
            message += payload
            if header.fin:
                break
        if opcode == OPCODE_TEXT:
            return message.decode("utf-8")  # UnicodeDecodeError: see receive()
        return bytes(message)

    def receive(self) -> Any:
        """Return the next text (str) or binary (bytes) message; None once closed."""
        if self.closed:
            return None
        try:
            return self.read_message()
        except MessageTooBig:
            self.close(CLOSE_TOO_BIG, b"message too big")
        except UnicodeError:
            self.close(CLOSE_INVALID_DATA, b"invalid UTF-8")
        except ProtocolError:
            self.close(CLOSE_PROTOCOL_ERROR, b"protocol error")
        except (WebSocketError, OSError):
            self.close()
        return None

    # --- writing

    def send(self, message: Any, binary: bool | None = None) -> None:
        """Send a text (str) or binary (bytes) message."""
        if isinstance(message, str):
            self.send_frame_bytes(encode_frame(message.encode("utf-8"), OPCODE_TEXT))
        else:
            self.send_frame_bytes(encode_frame(bytes(message), OPCODE_BINARY))

    def send_frame_bytes(self, frame: bytes) -> bool:
        """Queue a complete frame for the peer; return False if the socket is gone.

        Never blocks: what the kernel does not take now waits in a bounded
        backlog that a short-lived greenlet flushes in order.
        """
        if self.closed:
            return False
        if self.backlog:
            return self._enqueue(frame)
        try:
            sent = self.sock._sock.send(frame)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.abort()
            return False
        if sent < len(frame):
            return self._enqueue(frame[sent:])
        return True

    def _enqueue(self, data: bytes) -> bool:
        if self.backlog_bytes + len(data) > self.max_buffer:
            log.warning("closing a websocket that does not read: %d bytes queued", self.backlog_bytes)
            self.slow_consumer_closed()
            self.abort(CLOSE_POLICY)
            return False
        self.backlog.append(data)
        self.backlog_bytes += len(data)
        if self.flusher is None:
            self.flusher = gevent.spawn(self._flush)
        return True

    def _flush(self) -> None:
        try:
            while self.backlog and not self.closed:
                wait_write(self.sock.fileno(), timeout=self.write_timeout,
                           timeout_exc=TimeoutError("peer does not read"))
                data = self.backlog[0]
                try:
                    sent = self.sock._sock.send(data)
                except BlockingIOError:
                    continue
                self.backlog_bytes -= sent
                if sent < len(data):
                    self.backlog[0] = data[sent:]
                else:
                    self.backlog.popleft()
        except (OSError, ValueError):  # gone, or timed out (TimeoutError is an OSError)
            self.abort()
        finally:
            self.flusher = None

    def slow_consumer_closed(self) -> None:
        """Hook: a peer was cut off for not reading (counted by metrics later)."""

    # --- closing

    def close(self, code: int = CLOSE_NORMAL, message: Any = b"") -> None:
        """Send a close frame with ``code`` (after what is queued) and shut the connection."""
        if self.closed:
            return
        reason = message.encode() if isinstance(message, str) else bytes(message or b"")
        frame = encode_frame(struct.pack("!H", code) + reason[:123], OPCODE_CLOSE)
        if not self.backlog:
            try:
                self.sock._sock.send(frame)
            except OSError:
                pass  # the peer is gone or not reading: nothing more to tell it
        self._shutdown(code)

    def abort(self, code: int = 1006) -> None:
        """Drop the connection at once, without a close frame."""
        if not self.closed:
            self._shutdown(code)

    def _shutdown(self, code: int) -> None:
        self.closed = True  # type: ignore[misc]
        self.backlog.clear()
        self.backlog_bytes = 0
        try:
            # Wakes the greenlet blocked reading this socket: it sees EOF,
            # returns, and the server closes the connection and frees its slot.
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already gone
        callback, self.on_close = self.on_close, None
        if callback is not None:
            callback(code)
        # What gevent-websocket's close() releases (setattr: its slots).
        for name in ("stream", "raw_write", "raw_read", "environ"):
            setattr(self, name, None)

    def handle_close(self, header: Any, payload: bytes) -> None:
        # The peer's close: answer with the same code when it is valid.
        code = CLOSE_NORMAL
        if len(payload) >= 2:
            received = struct.unpack("!H", payload[:2])[0]
            code = received if self._is_valid_close_code(received) else CLOSE_PROTOCOL_ERROR
        elif payload:
            code = CLOSE_PROTOCOL_ERROR
        self.close(code)

    def __del__(self) -> None:
        # gevent-websocket's __del__ calls close(), which would write to a
        # socket the server may already have reused; nothing to do here.
        pass
