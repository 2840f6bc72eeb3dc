"""A long-lived connection that costs no greenlet: direct writes with a bounded backlog.

The part of the WebSocket transport (``transport/websocket.py``) that has
nothing to do with frames, shared with the Server-Sent Events stream
(``http/stream.py``), which is the same problem with another framing:

- **No greenlet while idle** (``adopt``): the request's greenlet hands the
  socket over and ends; a libev read watcher calls ``_readable`` in the hub
  when bytes (or the end) arrive.
- **Writes go straight to the socket** (``send_bytes``): one non-blocking
  ``send`` of bytes built once; only what the kernel does not take at once
  is kept, up to ``max_buffer`` bytes, and flushed in order by a greenlet
  that exists only while something waits. Past the bound the peer is cut
  off and counted as a slow consumer.
- **Closing frees the slot once** (``_drop``): the TCP connection is shut
  and closed, and the worker's connection count (``serving.OrgcastServer``)
  given back.

Written by hand because no gevent library writes to many idle sockets
without a greenlet (or a lock and a ``sendall``) per socket.
"""

from __future__ import annotations

import logging
import socket
from collections import deque
from collections.abc import Callable
from typing import Any

import gevent
from gevent.socket import wait_write

log = logging.getLogger(__name__)

#: environ key under which the request handler leaves ``accept_stream`` for an event stream
#: (``serving.OrgcastHandler``): ``accept(status, headers, first_bytes, kind)`` answers now
#: and returns ``kind(sock, handler, chunked)``, a Connection to adopt
STREAM_KEY = "orgcast.stream.accept"

CLOSE_NORMAL = 1000
#: the close code given to ``on_close`` for a connection dropped without a close handshake
CLOSE_ABNORMAL = 1006
#: ... and for a peer cut off for not reading
CLOSE_POLICY = 1008


class Connection:
    """A socket taken from its request: bytes out without blocking, the end noticed in the hub."""

    __slots__ = ("sock", "owner", "closed", "backlog", "backlog_bytes", "flusher", "watcher", "on_close",
                 "release", "lingering")

    #: set from ORGCAST_SEND_BUFFER when the worker starts
    max_buffer: int = 4 * 1048576
    #: seconds the flusher waits for a peer to take more bytes before giving up
    write_timeout: float = 30.0
    #: called for each peer cut off for not reading (set by create_app: the metrics)
    on_slow_consumer: Callable[[], None] | None = None
    #: what the log calls it
    kind = "a connection"

    def __init__(self, sock: Any, owner: Any = None) -> None:
        self.sock = sock
        #: the request handler that accepted it, until ``adopt``: its ``hand_over(sock)``
        #: makes it let go of the socket and returns a callable that frees the slot
        self.owner = owner
        self.closed = False
        self.backlog: deque[bytes] | None = None
        self.backlog_bytes = 0
        self.flusher: Any = None
        self.watcher: Any = None
        #: after a close that waits for the peer's: the timer that drops the connection anyway
        self.lingering: Any = None
        #: called once, with the close code, when the connection is closed
        self.on_close: Callable[[int], None] | None = None
        self.release: Callable[[], None] | None = None

    # --- reading: the subclass's ``_readable``, called in the hub

    def adopt(self) -> bool:
        """Take the socket from the request's greenlet: a watcher calls ``_readable`` from now on.

        The request handler (``app/serving.py``) then neither closes the socket
        when the request ends nor stops counting it as a connection. Return
        False when there is no such handler (or the connection is closed).
        """
        owner, self.owner = self.owner, None
        if owner is None or self.closed:
            return False
        self.release = owner.hand_over(self.sock)
        self.watcher = gevent.get_hub().loop.io(self.sock.fileno(), 1)
        self.watcher.start(self._readable)
        return True

    def _readable(self) -> None:
        raise NotImplementedError

    def _received(self) -> bytes | None:
        """What the peer sent (b"" when it is gone: the connection is aborted), None if nothing yet."""
        try:
            # internal: gevent.socket.socket._sock
            chunk: bytes = self.sock._sock.recv(65536)
        except BlockingIOError:
            return None
        except OSError:
            chunk = b""
        if not chunk:
            self.abort()
        return chunk

    # --- writing

    def send_bytes(self, data: bytes) -> bool:
        """Queue bytes for the peer; return False if the connection is gone.

        Never blocks: what the kernel does not take now waits in a bounded
        backlog that a short-lived greenlet flushes in order.
        """
        if self.closed:
            return False
        if self.backlog:
            return self._enqueue(data)
        try:
            # internal: gevent.socket.socket._sock
            sent = self.sock._sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.abort()
            return False
        if sent < len(data):
            return self._enqueue(data[sent:])
        return True

    def _enqueue(self, data: bytes) -> bool:
        if self.backlog_bytes + len(data) > self.max_buffer:
            log.warning("closing %s that does not read: %d bytes queued", self.kind, self.backlog_bytes)
            if Connection.on_slow_consumer is not None:
                Connection.on_slow_consumer()
            self.abort(CLOSE_POLICY)
            return False
        if self.backlog is None:
            self.backlog = deque()
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
                backlog = self.backlog
                if self.closed or not backlog:
                    return  # closed while waiting (the close dropped the backlog)
                data = backlog[0]
                try:
                    # internal: gevent.socket.socket._sock
                    sent = self.sock._sock.send(data)
                except BlockingIOError:
                    continue
                self.backlog_bytes -= sent
                if sent < len(data):
                    backlog[0] = data[sent:]
                else:
                    backlog.popleft()
        except (OSError, ValueError):  # gone, or timed out (TimeoutError is an OSError)
            self.abort()
        finally:
            self.flusher = None
            if not self.backlog:
                self.backlog = None

    # --- closing

    def abort(self, code: int = CLOSE_ABNORMAL) -> None:
        """Drop the connection at once, saying nothing more to the peer."""
        if not self.closed:
            self._shutdown(code)

    def _shutdown(self, code: int) -> None:
        self._end_session()
        self._drop()
        self._closed_callback(code)

    def _end_session(self) -> None:
        self.closed = True
        self.backlog = None
        self.backlog_bytes = 0
        flusher, self.flusher = self.flusher, None
        if flusher is not None and flusher is not gevent.getcurrent():
            flusher.kill(block=False)

    def _drop(self) -> None:
        """Close the TCP connection and free its slot (once)."""
        lingering, self.lingering = self.lingering, None
        if lingering is not None:
            lingering.stop()
            lingering.close()
        try:
            # Wakes a greenlet blocked reading this socket: it sees EOF and ends.
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already gone
        watcher, self.watcher = self.watcher, None
        if watcher is not None:
            # Adopted: nobody else will close it; free its slot.
            watcher.stop()
            watcher.close()
            self.sock.close()
        release, self.release = self.release, None
        if release is not None:
            release()

    def _closed_callback(self, code: int) -> None:
        callback, self.on_close = self.on_close, None
        if callback is not None:
            callback(code)
