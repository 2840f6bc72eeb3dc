"""The WebSocket transport: handshake, frame reading with limits, direct writes.

A fork of gevent-websocket 0.10.1 (``geventwebsocket/websocket.py`` and the
handshake half of ``geventwebsocket/handler.py``), of which it keeps the
exceptions and the table of valid close codes. What it changes, and why:

- **The upgrade happens when Engine.IO accepts the request**, not before
  the application runs: gevent-websocket answers ``101`` first and lets the
  application look afterwards, so a request Engine.IO refused (bad Origin,
  ``EIO``, ``transport`` or ``sid``) was upgraded and then closed with 1000,
  and the official client waited 20 s for a timeout instead of seeing the
  HTTP error. Here the handler only checks the handshake headers and leaves
  ``accept`` in the environ; Engine.IO calls it once it has said yes.
- **An idle WebSocket costs no greenlet** (``adopt``): once the session is
  open, the request's greenlet hands the socket over and ends, and a libev
  read watcher parses frames as bytes arrive. gevent-websocket kept a
  greenlet blocked in ``receive()`` per socket, with every frame of its
  stack (about 20 KiB a socket, and a switch per pong).
- **Sizes are capped from the header, before reading**: a frame, or a
  fragmented message, over ``max_message`` bytes is refused with close code
  1009 (gevent-websocket reads whatever length a header announces).
- **Client frames must be masked**, and reserved bits clear (RFC 6455 5.1,
  5.2), or the connection is closed with 1002.
- **Closing closes**: ``close()`` sends the close code it is given
  (gevent-websocket's dropped it) and shuts the TCP connection, after the
  peer's own close or at most ``linger`` seconds, reading nothing more
  (gevent-websocket left the reader blocked until the peer spoke again).
- **Writes go straight to the socket** (``send_frame_bytes``): one
  non-blocking ``send`` of bytes built once, with no lock, no ``sendall``
  and no ``getsockopt`` per write; only what the kernel does not take at once
  is kept, up to ``max_buffer`` bytes, and flushed by a greenlet that exists
  only while something is waiting. Past the bound the peer is cut off
  (close code 1008): a client that stops reading holds at most that much.
- Unmasking is done on whole integers instead of byte by byte in Python,
  and nothing is buffered between messages.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import socket
import struct
from collections.abc import Callable
from typing import Any

import gevent
from geventwebsocket.exceptions import ProtocolError
from geventwebsocket.websocket import WebSocket as _GeventWebSocket

from app.transport.connection import Connection

log = logging.getLogger(__name__)

#: environ key under which the handler leaves ``accept()`` for Engine.IO
ACCEPT_KEY = "orgcast.websocket.accept"

SUPPORTED_VERSIONS = ("13", "8", "7")
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OPCODE_CONTINUATION = 0x00
OPCODE_TEXT = 0x01
OPCODE_BINARY = 0x02
OPCODE_CLOSE = 0x08
OPCODE_PING = 0x09
OPCODE_PONG = 0x0A

#: close codes (RFC 6455 section 7.4.1)
CLOSE_NORMAL = 1000
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_INVALID_DATA = 1007
CLOSE_TOO_BIG = 1009

# internal: geventwebsocket.websocket.WebSocket._is_valid_close_code
_is_valid_close_code = _GeventWebSocket._is_valid_close_code


class MessageTooBig(ProtocolError):  # type: ignore[misc]
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


class _Closed(Exception):
    """The connection was closed while parsing (the close frame is answered)."""


class WebSocket(Connection):
    """One server-side WebSocket connection: frames in, frames out."""

    __slots__ = ("buffer", "fragments", "fragments_size", "fragments_opcode", "on_message")

    #: set from ORGCAST_MAX_PAYLOAD when the worker starts
    max_message: int = 1048576
    #: seconds a closed connection waits for the peer's own close before it is dropped
    linger: float = 1.0
    kind = "a websocket"

    def __init__(self, sock: Any, owner: Any = None) -> None:
        super().__init__(sock, owner)
        #: bytes received and not yet parsed (empty between messages)
        self.buffer = b""
        self.fragments: list[bytes] | None = None
        self.fragments_size = 0
        self.fragments_opcode = 0
        #: after ``adopt``: called, in the hub, with each message (str or bytes)
        self.on_message: Callable[[Any], None] | None = None

    # --- reading: one parser, fed by a blocking loop or by a read watcher

    def receive(self) -> Any:
        """Block until the next text (str) or binary (bytes) message; None once closed.

        For the upgrade handshake, while the request's greenlet still owns the socket.
        """
        while not self.closed:
            try:
                message = self._next_message()
            except _Closed:
                return None
            except ProtocolError as exc:
                self._refuse(exc)
                return None
            if message is not None:
                return message
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                self.abort()
                return None
            self.buffer += chunk
        return None

    def adopt(self, on_message: Callable[[Any], None]) -> bool:  # type: ignore[override]
        """Read with a watcher from now on, handing each message to ``on_message`` (in the hub).

        Return False, and keep reading with ``receive()``, when there is no
        request handler to take the socket from (``Connection.adopt``).
        """
        if not super().adopt():
            return False
        self.on_message = on_message
        if self.buffer:  # bytes that arrived with the last blocking read
            gevent.get_hub().loop.run_callback(self._parse_buffered)
        return True

    def _readable(self) -> None:
        # Runs in the hub: parse, hand messages on; never block here.
        if self.closed:
            self._discard()
            return
        chunk = self._received()
        if not chunk:
            return
        self.buffer += chunk
        self._parse_buffered()

    def _parse_buffered(self) -> None:
        try:
            while not self.closed:
                message = self._next_message()
                if message is None:
                    return
                if self.on_message is not None:
                    self.on_message(message)
        except _Closed:
            return
        except ProtocolError as exc:
            self._refuse(exc)
        except Exception:
            log.exception("websocket message handling failed")
            self.close(1011, b"internal error")

    def _next_message(self) -> Any:
        """Parse frames from the buffer; return a whole message, or None if more bytes are needed.

        :raise ProtocolError: a frame or message that breaks RFC 6455 or the size cap
        :raise _Closed: the peer sent a close frame (answered)
        """
        while True:
            buffer = self.buffer
            if len(buffer) < 2:
                return None
            first, second = buffer[0], buffer[1]
            fin, opcode, length = first & 0x80, first & 0x0F, second & 0x7F
            if first & 0x70:
                raise ProtocolError("reserved bits set")
            if not second & 0x80:
                raise ProtocolError("client frames must be masked")
            offset = 2
            if length == 126:
                if len(buffer) < 4:
                    return None
                length = struct.unpack_from("!H", buffer, 2)[0]
                offset = 4
            elif length == 127:
                if len(buffer) < 10:
                    return None
                length = struct.unpack_from("!Q", buffer, 2)[0]
                offset = 10
            if opcode >= OPCODE_CLOSE and (not fin or length > 125):
                raise ProtocolError("a control frame must be final and at most 125 bytes")
            if length > self.max_message or (opcode == OPCODE_CONTINUATION
                                             and self.fragments_size + length > self.max_message):
                raise MessageTooBig(f"frame of {length} bytes")
            end = offset + 4 + length
            if len(buffer) < end:
                return None
            payload = _unmask(buffer[offset + 4:end], buffer[offset:offset + 4]) if length else b""
            self.buffer = buffer[end:]
            message = self._frame(fin, opcode, payload)
            if message is not None:
                return message

    def _frame(self, fin: int, opcode: int, payload: bytes) -> Any:
        if opcode == OPCODE_PING:
            self.send_frame_bytes(encode_frame(payload, OPCODE_PONG))
            return None
        if opcode == OPCODE_PONG:
            return None
        if opcode == OPCODE_CLOSE:
            self._peer_closed(payload)
            raise _Closed()
        if opcode in (OPCODE_TEXT, OPCODE_BINARY):
            if self.fragments is not None:
                raise ProtocolError("a new message inside a fragmented one")
            if not fin:
                self.fragments, self.fragments_size, self.fragments_opcode = [payload], len(payload), opcode
                return None
            return _decode(opcode, payload)
        if opcode == OPCODE_CONTINUATION:
            if self.fragments is None:
                raise ProtocolError("a continuation frame without a message")
            self.fragments.append(payload)
            self.fragments_size += len(payload)
            if not fin:
                return None
            whole, opcode = b"".join(self.fragments), self.fragments_opcode
            self.fragments, self.fragments_size = None, 0
            return _decode(opcode, whole)
        raise ProtocolError(f"unknown opcode {opcode}")

    def _refuse(self, exc: ProtocolError) -> None:
        if isinstance(exc, MessageTooBig):
            self.close(CLOSE_TOO_BIG, b"message too big")
        elif isinstance(exc, _InvalidText):
            self.close(CLOSE_INVALID_DATA, b"invalid UTF-8")
        else:
            log.debug("websocket protocol error: %s", exc)
            self.close(CLOSE_PROTOCOL_ERROR, b"protocol error")

    # --- writing

    def send(self, message: Any) -> None:
        """Send a text (str) or binary (bytes) message."""
        if isinstance(message, str):
            self.send_frame_bytes(encode_frame(message.encode("utf-8"), OPCODE_TEXT))
        else:
            self.send_frame_bytes(encode_frame(bytes(message), OPCODE_BINARY))

    #: queue a complete frame for the peer (never blocks; False if the socket is gone)
    send_frame_bytes = Connection.send_bytes

    # --- closing

    def close(self, code: int = CLOSE_NORMAL, message: Any = b"", linger: bool = True) -> None:
        """Send a close frame with ``code`` (when nothing else is queued) and shut the connection.

        The session ends now. The TCP connection lingers (up to ``linger``
        seconds, reading and dropping) until the peer answers with its own
        close: a client often sends one of its own just then, and a socket
        closed under it answers with a reset, which a proxy in front logs as
        an error (nginx: "send() failed (32: Broken pipe) while proxying
        upgraded connection").
        """
        if self.closed:
            return
        reason = message.encode() if isinstance(message, str) else bytes(message or b"")
        frame = encode_frame(struct.pack("!H", code) + reason[:123], OPCODE_CLOSE)
        sent = False
        if not self.backlog:
            try:
                # internal: gevent.socket.socket._sock
                self.sock._sock.send(frame)
                sent = True
            except OSError:
                pass  # the peer is gone or not reading: nothing more to tell it
        if sent and linger and self.watcher is not None:
            self._end_session()
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                self._drop()
            else:
                self.lingering = gevent.get_hub().loop.timer(self.linger)
                self.lingering.start(self._drop)
            self._closed_callback(code)
            return
        self._shutdown(code)

    def _peer_closed(self, payload: bytes) -> None:
        # The peer's close: answer with the same code when it is valid.
        code = CLOSE_NORMAL
        if len(payload) >= 2:
            received = struct.unpack("!H", payload[:2])[0]
            code = received if _is_valid_close_code(None, received) else CLOSE_PROTOCOL_ERROR
        elif payload:
            code = CLOSE_PROTOCOL_ERROR
        self.close(code, linger=False)

    def _discard(self) -> None:
        # Lingering after our close: drop what the peer still sends, until it closes.
        try:
            # internal: gevent.socket.socket._sock
            if self.sock._sock.recv(65536):
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        self._drop()

    def _end_session(self) -> None:
        super()._end_session()
        self.buffer = b""
        self.fragments = None

    def _closed_callback(self, code: int) -> None:
        self.on_message = None
        super()._closed_callback(code)


class _InvalidText(ProtocolError):  # type: ignore[misc]
    """A text message that is not UTF-8."""


def _decode(opcode: int, payload: bytes) -> Any:
    if opcode == OPCODE_TEXT:
        try:
            return payload.decode("utf-8")
        except UnicodeDecodeError:
            raise _InvalidText("invalid UTF-8") from None
    return payload
