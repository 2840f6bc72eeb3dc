"""The WebSocket writer alone, on a socketpair (``transport/websocket.py``): closed while its backlog
waits for a peer that does not read, the flusher ends quietly (issue 16: it indexed the backlog
that the close had dropped, a TypeError traceback at every slow consumer cut off)."""

from __future__ import annotations

import socket

import gevent
import gevent.socket

from app.transport.websocket import WebSocket


class SmallBuffer(WebSocket):
    max_buffer = 200_000


def test_a_writer_cut_off_while_its_flusher_waits_ends_without_an_error() -> None:
    a, b = gevent.socket.socketpair()
    try:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        ws = SmallBuffer(a)
        frame = b"\x81\x7e\x27\x10" + b"x" * 10_000
        while ws.flusher is None:
            assert ws.send_frame_bytes(frame)
        flusher = ws.flusher
        gevent.sleep(0.01)  # the flusher now waits for the peer to read
        # The interleaving of the traceback: the flusher is woken (here by the shutdown)
        # after a close dropped the backlog, and runs before any kill reaches it.
        ws.flusher = None
        while ws.send_frame_bytes(frame):  # past max_buffer: cut off (as a slow consumer is)
            pass
        assert ws.closed
        flusher.join(2)
        assert flusher.dead
        assert flusher.exception is None, f"the flusher died of {flusher.exception!r}"
    finally:
        a.close()
        b.close()


def test_a_backlog_is_flushed_in_order_once_the_peer_reads() -> None:
    a, b = gevent.socket.socketpair()
    try:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        ws = WebSocket(a)
        frames = [bytes([0x81, 0x7E]) + (1000).to_bytes(2, "big") + bytes([65 + n % 26]) * 1000 for n in range(60)]
        for frame in frames:
            assert ws.send_frame_bytes(frame)
        assert ws.flusher is not None
        expected = b"".join(frames)
        got = b""
        while len(got) < len(expected):
            got += b.recv(65536)
        assert got == expected
        gevent.sleep(0)
        assert ws.backlog is None and ws.flusher is None
    finally:
        a.close()
        b.close()
