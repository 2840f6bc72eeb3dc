"""Raw Engine.IO / Socket.IO sessions for the protocol tests: frames as a client
sends them, with nothing the official client would correct or hide."""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import websocket

#: the settings the official protocol test suites expect (they use 300/200 ms)
SUITE_ENV = {
    "ORGCAST_PING_INTERVAL": "0.3",
    "ORGCAST_PING_TIMEOUT": "0.2",
    "ORGCAST_CONNECT_TIMEOUT": "1",
    "ORGCAST_MAX_PAYLOAD": "1000000",
    "ORGCAST_BODY_TIMEOUT": "1",
}


@dataclass
class RawSession:
    """A WebSocket Engine.IO session; ``recv()`` answers pings by itself."""

    ws: websocket.WebSocket
    open: dict[str, Any]
    pings: int = 0
    answer_pings: bool = True
    seen: list[str | bytes] = field(default_factory=list)

    @classmethod
    def connect(cls, port: int, query: str = "EIO=4&transport=websocket", source: str | None = None,
                **options: Any) -> RawSession:
        """Open a session; ``source``: the client address to connect from (127.0.0.x)."""
        if source is not None:
            sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
            options["socket"] = sock
        ws = websocket.create_connection(f"ws://127.0.0.1:{port}/socket.io/?{query}", timeout=5,
                                         **options)
        first = ws.recv()
        assert isinstance(first, str) and first.startswith("0"), first
        return cls(ws, json.loads(first[1:]))

    def send(self, data: str | bytes) -> None:
        if isinstance(data, bytes):
            self.ws.send_binary(data)
        else:
            self.ws.send(data)

    def recv(self, timeout: float = 5.0) -> str | bytes:
        """Return the next message that is not a ping; fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"nothing but pings within {timeout} s (saw {self.seen})")
            self.ws.settimeout(remaining)
            try:
                message = self.ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            self.seen.append(message)
            if message == "2":
                self.pings += 1
                if self.answer_pings:
                    self.ws.send("3")
                continue
            return message

    def connect_socketio(self, auth: dict[str, Any] | None = None, namespace: str = "") -> str:
        """Send a Socket.IO CONNECT; return the server's answer."""
        payload = json.dumps(auth) if auth is not None else ""
        self.send(f"40{namespace}{',' if namespace and payload else ''}{payload}")
        answer = self.recv()
        assert isinstance(answer, str)
        return answer

    def wait_closed(self, timeout: float) -> float:
        """Wait until the server closes the connection; return how long it took."""
        started = time.monotonic()
        deadline = started + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"still open after {timeout} s (saw {self.seen})")
            self.ws.settimeout(remaining)
            try:
                opcode, data = self.ws.recv_data(control_frame=True)
            except (websocket.WebSocketConnectionClosedException, ConnectionError, OSError):
                return time.monotonic() - started
            except websocket.WebSocketTimeoutException:
                continue
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                # The close frame; the TCP connection must end right after it.
                self.ws.sock.settimeout(max(0.1, deadline - time.monotonic()))
                try:
                    rest = self.ws.sock.recv(1)
                except OSError:
                    rest = b""
                assert rest == b"", "the server sent a close frame but kept the TCP connection"
                return time.monotonic() - started
            if opcode == websocket.ABNF.OPCODE_TEXT:
                text = data.decode()
                self.seen.append(text)
                if text == "2" and self.answer_pings:
                    self.ws.send("3")

    def close(self) -> None:
        try:
            self.ws.close(timeout=0.5)
        except Exception:  # already gone: nothing to say goodbye to
            pass
        finally:
            self.ws.shutdown()


@dataclass
class HttpReply:
    status: int
    headers: dict[str, str]
    body: bytes
    closed: bool

    def json(self) -> Any:
        return json.loads(self.body)


def raw_http(port: int, request: bytes, timeout: float = 5.0) -> HttpReply:
    """Send one raw HTTP request; read one response (and whether the server then closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        return read_response(sock, timeout)


def read_response(sock: socket.socket, timeout: float = 5.0) -> HttpReply:
    """Read one HTTP/1.1 response with a Content-Length; tell whether the server closed after it."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before a response: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    sock.settimeout(0.5)
    try:
        closed = sock.recv(1) == b""
    except TimeoutError:
        closed = False
    except ConnectionError:
        closed = True
    return HttpReply(status, headers, body[:length], closed)


def _hex_address(address: tuple[str, int]) -> str:
    host, port = address[:2]
    return f"{socket.inet_aton(host)[::-1].hex().upper()}:{port:04X}"


def wait_until_read_by_server(sock: socket.socket, timeout: float = 5.0) -> None:
    """Wait until the server has read everything sent on ``sock``: its end's receive queue
    (Linux's /proc/net/tcp) is empty. A gevent server runs a request from its read to
    its first wait without yielding, so after this the request is waiting in the
    server, not on the way to it: a barrier where a sleep would only hope."""
    client, server = _hex_address(sock.getsockname()), _hex_address(sock.getpeername())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open("/proc/net/tcp") as table:
            queues = {(f[1], f[2]): f[4].split(":") for f in (line.split() for line in table.read().splitlines()[1:])}
        # the client's bytes acknowledged (so in the server's queue or read), and that queue empty
        sent, read = queues.get((client, server)), queues.get((server, client))
        if sent and read and int(sent[0], 16) == 0 and int(read[1], 16) == 0:
            return
        time.sleep(0.005)
    raise AssertionError("the server did not read the request")


def upgrade_request(path: str, headers: dict[str, str] | None = None) -> bytes:
    """A WebSocket upgrade request line and headers, as a browser sends them."""
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", "Upgrade: websocket", "Connection: Upgrade",
             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()
