"""The real gunicorn process survives a database that is down, hung or slow, and
clients that send garbage (README, "Limits that protect the process"): it answers ``unavailable`` / ``503``,
keeps serving everyone else, and recovers by itself.

Every test here that stops, pauses or slows Postgres does so to this module's
own server (``own_postgres``), never the session one other modules share.
"""

from __future__ import annotations

import base64
import json
import os
import random
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import socketio
import websocket
from conftest import API_KEY, ROOT, Listener, Server, base_env, publish, raw_exchange, rss_kib
from throwaway import ThrowawayPostgres, children_of

pytestmark = pytest.mark.slow

MAX_PAYLOAD = 65536


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[ThrowawayPostgres]:
    """A Postgres for this module alone: its tests stop, freeze and slow it."""
    pg = ThrowawayPostgres().start()
    try:
        pg.load(ROOT / "scripts" / "schema.sql")
        pg.load(ROOT / "tests" / "data.sql")
        # A row here makes SLOW_TOKEN_SQL sleep 5 s per lookup.
        pg.psql("CREATE TABLE slow_switch (on_ boolean)")
        yield pg
    finally:
        pg.stop()


@pytest.fixture
def pg(own_postgres: ThrowawayPostgres) -> Iterator[ThrowawayPostgres]:
    """The module's Postgres, left running and fast whatever the test did to it."""
    yield own_postgres
    if own_postgres.proc is None:
        own_postgres.restart()
    else:
        own_postgres.resume()
    own_postgres.psql("DELETE FROM slow_switch")


# --- helpers ----------------------------------------------------------------------


def wait_until(predicate: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.05) -> Any:
    """Return the first truthy ``predicate()``; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} within {timeout} s")
        time.sleep(interval)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http(method: str, url: str, **kwargs: Any) -> Reply:
    """Make one request and close its connection (an idle keep-alive one would
    hold gunicorn's graceful shutdown for its whole timeout)."""
    kwargs.setdefault("timeout", 5)
    with requests.request(method, url, **kwargs) as response:
        return Reply(response.status_code, dict(response.headers), response.content)


def readyz(server: Server) -> tuple[int, Any]:
    reply = http("GET", server.url + "/readyz")
    return reply.status, reply.json()


def healthz_seconds(server: Server) -> float:
    started = time.monotonic()
    reply = http("GET", server.url + "/healthz")
    assert reply.status == 200
    assert reply.json() == {"status": "ok"}
    return time.monotonic() - started


def worker_pids(master: int) -> set[int]:
    """PIDs of gunicorn's workers."""
    return children_of(master)


def assert_delivers(server: Server, listen: Callable[..., Listener], **connect: Any) -> None:
    """A new client connects to org-a and receives an event published to it."""
    listener = listen(server.url, auth={"token": "tok-alice", "organizationId": "org-a"},
                      **connect)
    assert listener.connect_error is None, listener.connect_error
    marker = f"after-{time.monotonic()}"
    assert publish(server, "org-a", "news", {"marker": marker}).status_code == 202
    assert listener.wait_for("news") == {"marker": marker}


def timed_connect(server: Server, token: str, org: str = "org-a") -> tuple[Listener, float]:
    started = time.monotonic()
    listener = Listener().connect(server.url, auth={"token": token, "organizationId": org})
    return listener, time.monotonic() - started


# --- database down ----------------------------------------------------------------


def test_database_stopped_then_restarted(pg: ThrowawayPostgres, gunicorn_factory: Any,
                                         listen: Any) -> None:
    server = gunicorn_factory(base_env(pg, ORGCAST_DB_TIMEOUT="1"))
    workers = worker_pids(server.proc.pid)
    assert len(workers) == 1
    before = listen(server.url, auth={"token": "tok-carol", "organizationId": "org-b"})
    assert before.connect_error is None

    pg.stop_server()
    status, body = wait_until(lambda: (r := readyz(server))[0] == 503 and r, 10,
                              "503 from /readyz")
    assert body["status"] != "ok"
    assert body["checks"]["database"]["ok"] is False
    healthz_seconds(server)

    refused, elapsed = timed_connect(server, "tok-dave")
    try:
        assert refused.refusal_code == "unavailable", refused.connect_error
        assert elapsed < 3.0
    finally:
        refused.close()

    pg.restart()
    status, body = wait_until(lambda: (r := readyz(server))[0] == 200 and r, 15,
                              "200 from /readyz after the restart")
    assert body["checks"]["database"]["ok"] is True
    assert server.alive()
    assert worker_pids(server.proc.pid) == workers
    assert_delivers(server, listen)
    # The socket that was connected all along still gets events.
    assert publish(server, "org-b", "news", "still-here").status_code == 202
    assert before.wait_for("news") == "still-here"


# --- database hung or slow --------------------------------------------------------

# Sleeps 5 s per lookup while slow_switch has a row; still takes %(token)s and
# returns user_id, active, expires.
SLOW_TOKEN_SQL = (
    "SELECT user_id, expires > NOW() AS active, expires "
    "FROM oauth_access_tokens, "
    "(SELECT pg_sleep(CASE WHEN EXISTS (SELECT 1 FROM slow_switch) THEN 5 ELSE 0 END)) AS s "
    "WHERE access_token = %(token)s"
)


def _hang_and_recover(server: Server, listen: Any, hang: Callable[[], None],
                      recover: Callable[[], None], readiness_fails: bool) -> None:
    workers = worker_pids(server.proc.pid)
    # tok-carol connects once before the hang: from now on it is cached.
    listen(server.url, auth={"token": "tok-carol", "organizationId": "org-b"}).close()

    hang()
    # An uncached client waits on the database in the background...
    refused = Listener()
    elapsed: dict[str, float] = {}

    def connect_uncached() -> None:
        started = time.monotonic()
        refused.connect(server.url, auth={"token": "tok-alice", "organizationId": "org-a"})
        elapsed["uncached"] = time.monotonic() - started

    waiting = threading.Thread(target=connect_uncached)
    waiting.start()
    try:
        wait_until(lambda: refused.client.eio.state == "connected", 5,
                   "the uncached client's handshake")
        # ...while a cached client connects at once, and /healthz answers.
        cached, took = timed_connect(server, "tok-carol", "org-b")
        try:
            assert cached.connect_error is None, cached.connect_error
            assert took < 1.0, f"cached connect took {took:.2f} s during the hang"
        finally:
            cached.close()
        assert healthz_seconds(server) < 1.0
        assert refused.connect_error is None, "the uncached client was answered before"
        if readiness_fails:
            started = time.monotonic()
            status, body = readyz(server)
            assert status == 503 and body["checks"]["database"]["ok"] is False
            assert time.monotonic() - started < 3.0
    finally:
        waiting.join(15)
        refused.close()
    assert not waiting.is_alive()
    assert refused.refusal_code == "unavailable", refused.connect_error
    assert refused.connect_error["message"]
    assert elapsed["uncached"] < 3.0, f"refusal took {elapsed['uncached']:.2f} s"

    recover()
    wait_until(lambda: readyz(server)[0] == 200, 15, "ready after the hang")
    ok, _ = timed_connect(server, "tok-alice")
    try:
        assert ok.connect_error is None, ok.connect_error
    finally:
        ok.close()
    assert server.alive()
    assert worker_pids(server.proc.pid) == workers
    assert_delivers(server, listen)


def test_database_frozen(pg: ThrowawayPostgres, gunicorn_factory: Any, listen: Any) -> None:
    server = gunicorn_factory(base_env(pg, ORGCAST_DB_TIMEOUT="1",
                                       ORGCAST_AUTH_CACHE_TTL="60"))
    # Warm the pool, so the hang meets idle connections as well as new ones.
    assert readyz(server)[0] == 200
    _hang_and_recover(server, listen, pg.pause, pg.resume, readiness_fails=True)


def _unread_by_server(server_port: int, client_port: int) -> int:
    """Bytes the server side of a TCP connection on 127.0.0.1 has received and not read."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, queues = fields[1], fields[2], fields[4]
        if int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == client_port:
            return int(queues.split(":")[1], 16)
    return 0


def test_a_worker_stops_promptly_with_its_bus_listener_in_a_query_to_a_frozen_database(
        pg: ThrowawayPostgres, gunicorn_factory: Any) -> None:
    """SIGTERM while the listener waits on its keepalive (psycopg2 holds the connection's
    mutex through it): closing that connection under it blocked the worker until SIGKILL."""
    import signal

    server = gunicorn_factory(base_env(pg, ORGCAST_DB_TIMEOUT="1"))
    listener_port = int(pg.psql("SELECT client_port FROM pg_stat_activity "
                                "WHERE application_name = 'orgcast-listen'").split()[0])
    pg.pause()
    deadline = time.monotonic() + 15  # the listener sends its keepalive within 5 s of quiet
    while _unread_by_server(pg.port, listener_port) == 0:
        assert time.monotonic() < deadline, "the listener never sent its keepalive"
        time.sleep(0.05)
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(20)
    took = time.monotonic() - started
    pg.resume()
    assert "SIGKILL" not in server.output() and "WORKER TIMEOUT" not in server.output()
    assert took < 8, f"the worker took {took:.1f}s to stop (graceful_timeout is 10)"


def test_token_sql_slow(pg: ThrowawayPostgres, gunicorn_factory: Any, listen: Any) -> None:
    server = gunicorn_factory(base_env(pg, ORGCAST_DB_TIMEOUT="1", ORGCAST_AUTH_CACHE_TTL="60",
                                       ORGCAST_TOKEN_SQL=SLOW_TOKEN_SQL))
    _hang_and_recover(server, listen,
                      lambda: pg.psql("INSERT INTO slow_switch VALUES (true)"),
                      lambda: pg.psql("DELETE FROM slow_switch"),
                      readiness_fails=False)


# --- garbage on the wire ----------------------------------------------------------

WS_GARBAGE: list[str | bytes] = [
    "", "x", "9", "7abc", "4", "49", "4x", "40", "41", "46", "3", "5", "6", "2probe",
    '40"just a string"', "40[1,2]", "40123", "40null", "40true", '40"tok-alice"',
    '40{"token": {"$ne": null}, "organizationId": "org-a"}',
    '40{"token": ["tok-alice"], "organizationId": ["org-a"]}',
    '40{"token": "tok-alice", "organizationId": {"a": 1}}',
    '40{"token": "' + "t" * 5000 + '", "organizationId": "org-a"}',
    "40/" + "n" * 60000 + ",",
    "40/" + "n" * 60000 + ',{"token": "tok-alice", "organizationId": "org-a"}',
    "40/" + "\u00e9" * 20000 + ",{}",
    "42[", '42{"a":', '42["news"', "42[1,2,3]", '42["connect",{}]', '42["disconnect"]',
    '42/nope,["x"]', '421["x"]', "43", "431[]", '44{"message":"x"}',
    '451-["x",{"_placeholder":true,"num":0}]',
    '4599999999-["x",{"_placeholder":true,"num":0}]',
    '45x-["x"]', "42" + "[" * 5000, '42["' + "e" * 60000 + '"]',
    b"\x04" + bytes(range(256)), b"", b"\xff" * 100,
]


def _close_ws(ws: websocket.WebSocket) -> None:
    try:
        ws.close(timeout=1)
    except (websocket.WebSocketException, OSError):
        pass
    finally:
        ws.shutdown()  # close() leaves the socket open when the server closed first


def _ws_flood(server: Server, count: int) -> None:
    url = f"ws://127.0.0.1:{server.port}/socket.io/?EIO=4&transport=websocket"
    rng = random.Random(1234)
    ws = None
    try:
        for i in range(count):
            if ws is None or i % 12 == 0:
                if ws is not None:
                    _close_ws(ws)
                ws = websocket.create_connection(url, timeout=5)
            kind = i % 4
            try:
                if kind == 0:
                    ws.send_binary(rng.randbytes(rng.randrange(1, 2000)))
                elif kind == 1:
                    ws.send(bytes(rng.randrange(128, 256) for _ in range(20)),
                            opcode=websocket.ABNF.OPCODE_TEXT)  # not UTF-8
                else:
                    message = rng.choice(WS_GARBAGE)
                    if isinstance(message, bytes):
                        ws.send_binary(message)
                    else:
                        ws.send(message)
            except (websocket.WebSocketException, OSError):
                _close_ws(ws)
                ws = None  # the server closed it: fine, open another
    finally:
        if ws is not None:
            _close_ws(ws)


def _polling_sid(server: Server) -> str:
    reply = http("GET", server.url + "/socket.io/?EIO=4&transport=polling")
    assert reply.status == 200, reply.body
    return str(json.loads(reply.body[1:])["sid"])


def _polling_garbage(server: Server) -> None:
    bodies: list[bytes] = [b"garbage", b"", b"4", b"6", b"\x1e\x1e\x1e", b"40[1]\x1e42[",
                           b"42[\"news\"", b"\xff\xfe\xfd", b"b" + b"A" * 100, b"4" * 1000,
                           b"40" + json.dumps("tok-alice").encode(), b"1"]
    for body in bodies:
        sid = _polling_sid(server)
        url = f"{server.url}/socket.io/?EIO=4&transport=polling&sid={sid}"
        reply = http("POST", url, data=body, headers={"Content-Type": "text/plain;charset=UTF-8"})
        assert reply.status in (200, 400), (body, reply.status)
    for query in ("sid=bogus", "sid=", "EIO=3", "EIO=999&sid=x", "j=abc", ""):
        reply = http("POST", f"{server.url}/socket.io/?transport=polling&{query}", data=b"4")
        assert 400 <= reply.status < 500, (query, reply.status)


def _tcp_garbage(server: Server) -> None:
    rng = random.Random(99)
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(300))
    cases = [
        rng.randbytes(3000),
        b"GET /socket.io/?EIO=4&trans",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Len",
        b"POST /api/v1/organizations/org-a/events HTTP/1.1\r\nHost: x\r\n"
        b"Content-Length: 100\r\nAuthorization: Bearer " + API_KEY.encode() + b"\r\n\r\n{",
        b"\r\n\r\n\r\n",
        b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Long: " + b"v" * 100000 + b"\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header Without Colon\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Bin: \x00\x01\xff\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + rng.randbytes(200),
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"GET /socket.io/?EIO=4&transport=polling HTTP/9.9\r\n\r\n",
        b"BREW /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /socket.io/?EIO=4&transport=polling&sid=x HTTP/1.1\r\nHost: x\r\n"
        b"Content-Length: abc\r\n\r\n4",
        b"POST /socket.io/?EIO=4&transport=polling&sid=x HTTP/1.1\r\nHost: x\r\n"
        b"Content-Length: -5\r\n\r\n4",
        b"POST /api/v1/organizations/org-a/events HTTP/1.1\r\nHost: x\r\n"
        b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: x\r\n"
        b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n",
        b"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: x\r\n"
        b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: !!\r\n"
        b"Sec-WebSocket-Version: 99\r\n\r\n",
    ]
    for data in cases:
        raw_exchange(server, data)
    # Some of them get a proper answer.
    assert raw_exchange(server, cases[5]).startswith(b"HTTP/1.1 414 ")
    for bad_upgrade in cases[-2:]:
        assert raw_exchange(server, bad_upgrade).startswith(b"HTTP/1.1 400 "), bad_upgrade
    # Connections dropped mid-request, without a half-close first.
    for data in cases[:4]:
        raw_exchange(server, data, half_close=False)


def _ws_handshake(server: Server) -> tuple[socket.socket, bytes]:
    """Open a websocket by hand; return the socket and bytes read past the headers."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode())
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(4096)
        assert chunk, "closed during the websocket handshake"
        received += chunk
    head, _, rest = received.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].split()[1] == b"101", head
    return sock, rest


def _close_code(sock: socket.socket, buffered: bytes) -> int | None:
    """Read server frames until a close frame (return its code) or EOF (None)."""
    buffer = buffered

    def take(n: int) -> bytes | None:
        nonlocal buffer
        while len(buffer) < n:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            buffer += chunk
        out, buffer = buffer[:n], buffer[n:]
        return out

    for _ in range(100):
        head = take(2)
        if head is None:
            return None
        opcode, length = head[0] & 0x0F, head[1] & 0x7F
        if length == 126:
            ext = take(2)
            length = struct.unpack("!H", ext)[0] if ext else 0
        elif length == 127:
            ext = take(8)
            length = struct.unpack("!Q", ext)[0] if ext else 0
        payload = take(length) if length else b""
        if payload is None:
            return None
        if opcode == 0x8:
            return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
    raise AssertionError("no close frame in 100 frames")


def _masked_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    mask = os.urandom(4)
    first = (0x80 if fin else 0) | opcode
    if len(payload) < 126:
        head = struct.pack("!BB", first, 0x80 | len(payload))
    elif len(payload) < 65536:
        head = struct.pack("!BBH", first, 0x80 | 126, len(payload))
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, len(payload))
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def _oversized_websocket(server: Server) -> None:
    # A frame header announcing 2**40 bytes, and nothing after it: the server
    # must refuse it from the header, not wait for (or allocate) the payload.
    sock, rest = _ws_handshake(server)
    with sock:
        sock.sendall(struct.pack("!BBQ", 0x81, 0x80 | 127, 2**40) + os.urandom(4))
        assert _close_code(sock, rest) == 1009

    # A fragmented message whose fragments are each under the cap, not together.
    sock, rest = _ws_handshake(server)
    with sock:
        fragment = b"a" * 40000
        sock.sendall(_masked_frame(0x1, fragment, fin=False)
                     + _masked_frame(0x0, fragment, fin=False))
        assert _close_code(sock, rest) == 1009

    # One whole message over the cap, through a real client library. The server
    # refuses it from its header and lingers, reading and dropping the rest, so
    # the close frame arrives instead of a reset (the test fails without it).
    ws = websocket.create_connection(
        f"ws://127.0.0.1:{server.port}/socket.io/?EIO=4&transport=websocket", timeout=5)
    try:
        ws.send("4" + "x" * (MAX_PAYLOAD + 10))
        for _ in range(100):
            opcode, data = ws.recv_data(control_frame=True)
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                assert struct.unpack("!H", data[:2])[0] == 1009
                break
        else:
            raise AssertionError("no close frame")
    finally:
        _close_ws(ws)


def _oversized_http(server: Server) -> None:
    # A polling POST announcing a body far over the limit, with little of it
    # sent: the answer must come without the server waiting for the rest.
    sid = _polling_sid(server)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(f"POST /socket.io/?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\n"
                     f"Host: 127.0.0.1\r\nContent-Type: text/plain\r\n"
                     f"Content-Length: {10**12}\r\n\r\n".encode() + b"4" * 1000)
        status_line = sock.recv(4096).split(b"\r\n")[0]
    assert status_line.split()[1] in (b"400", b"413"), status_line

    sid = _polling_sid(server)
    reply = http("POST", f"{server.url}/socket.io/?EIO=4&transport=polling&sid={sid}",
                 data=b"4" * (MAX_PAYLOAD + 1))
    assert reply.status in (400, 413)

    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    big = json.dumps({"event": "news", "data": "x" * (MAX_PAYLOAD + 1)})
    reply = http("POST", f"{server.url}/api/v1/organizations/org-a/events", data=big,
                 headers=headers)
    assert reply.status == 413
    assert reply.json()["error"]["code"] == "payload_too_large"

    # The same without Content-Length (chunked): cut off at the limit.
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        chunk = b"x" * 8192
        body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(12)) + b"0\r\n\r\n"
        sock.sendall(b"POST /api/v1/organizations/org-a/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Authorization: Bearer " + API_KEY.encode() + b"\r\n"
                     b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + body)
        status_line = sock.recv(4096).split(b"\r\n")[0]
    assert status_line.split()[1] in (b"400", b"413"), status_line


def test_garbage_then_a_valid_client(pg: ThrowawayPostgres, gunicorn_factory: Any,
                                     listen: Any) -> None:
    server = gunicorn_factory(base_env(pg, ORGCAST_MAX_PAYLOAD=str(MAX_PAYLOAD)))
    (worker,) = worker_pids(server.proc.pid)
    listener = listen(server.url, auth={"token": "tok-carol", "organizationId": "org-b"})
    assert listener.connect_error is None
    rss_before = rss_kib(worker)

    _ws_flood(server, 300)
    _polling_garbage(server)
    _tcp_garbage(server)
    _oversized_websocket(server)
    _oversized_http(server)

    assert server.alive()
    assert worker_pids(server.proc.pid) == {worker}
    assert healthz_seconds(server) < 1.0
    growth = rss_kib(worker) - rss_before
    assert growth < 64 * 1024, f"worker RSS grew by {growth} KiB"
    assert_delivers(server, listen)
    assert_delivers(server, listen, transports=["polling"])
    # The client connected before the garbage is still served.
    assert publish(server, "org-b", "news", "survived").status_code == 202
    assert listener.wait_for("news") == "survived"


# --- several workers: polling refused clearly -------------------------------------


def test_polling_refused_with_several_workers(pg: ThrowawayPostgres, gunicorn_factory: Any,
                                              listen: Any) -> None:
    server = gunicorn_factory(base_env(pg, WEB_CONCURRENCY="2"))
    wait_until(lambda: len(worker_pids(server.proc.pid)) == 2, 15, "two workers")
    for _ in range(4):  # whichever worker answers
        reply = http("GET", server.url + "/socket.io/?EIO=4&transport=polling")
        assert reply.status == 400
        assert reply.headers["Content-Type"].startswith("application/json")
        error = reply.json()["error"]
        assert error["code"] == "polling_disabled"
        assert "websocket" in error["message"]
    reply = http("POST", server.url + "/socket.io/?EIO=4&transport=polling&sid=abc", data=b"40")
    assert reply.status == 400
    assert reply.json()["error"]["code"] == "polling_disabled"

    for token in ("tok-alice", "tok-bob", "tok-dave"):
        listener = listen(server.url, auth={"token": token, "organizationId": "org-a"})
        assert listener.connect_error is None, listener.connect_error
    # python-socketio's own client, told to poll, fails with the JSON error
    # (kept on the engine.io error it wraps).
    client = socketio.Client(reconnection=False)
    try:
        client.connect(server.url, transports=["polling"], wait_timeout=5,
                       auth={"token": "tok-alice", "organizationId": "org-a"})
    except socketio.exceptions.ConnectionError as exc:
        cause = repr(exc.__cause__.args if exc.__cause__ else exc.args)
    else:
        raise AssertionError("a polling client connected to two workers")
    finally:
        client.disconnect()
        if client.eio.http is not None:
            client.eio.http.close()
    assert "polling_disabled" in cause


def test_slow_or_silent_clients_are_cut_off_but_open_sockets_are_not(
        pg: ThrowawayPostgres, gunicorn_factory: Any, listen: Any) -> None:
    """A client that never finishes its headers (slowloris) or leaves a
    kept-alive connection idle is closed after ORGCAST_HEADER_TIMEOUT, quietly;
    open WebSockets and long-polls outlive it."""
    server = gunicorn_factory(base_env(pg, ORGCAST_HEADER_TIMEOUT="1"))
    ws_client = listen(server.url, auth={"token": "tok-alice", "organizationId": "org-a"},
                       transports=["websocket"])
    polling_client = listen(server.url, auth={"token": "tok-bob", "organizationId": "org-a"},
                            transports=["polling"])
    assert ws_client.client.connected and polling_client.client.connected

    for opening in (b"", b"GET /healthz HTTP/1.1\r\nHost: x\r\n"):  # silent; headers never end
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(opening)
            started = time.monotonic()
            assert sock.recv(1024) == b"", "the server closes the connection, answering nothing"
            assert 0.5 < time.monotonic() - started < 5

    # More than the timeout has passed: both sockets are still served.
    publish(server, "org-a", data={"after": "idle"})
    assert ws_client.wait_for("news") == {"after": "idle"}
    assert polling_client.wait_for("news") == {"after": "idle"}
    assert ws_client.client.connected and polling_client.client.connected
    ws_client.close()
    polling_client.close()
    server.stop()
    assert "Traceback" not in server.output()
