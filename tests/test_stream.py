"""Server-Sent Events (contract §4.2, issue 23), read with raw HTTP as curl -N would: the same
checks and codes as a Socket.IO connect, refused before the stream starts; the same rooms; ids
that resume with Last-Event-ID once and in order, or ``event: resync``; revocation ends it."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from conftest import API_KEY, Server, base_env, publish, start_gunicorn, unique
from test_lifecycle import new_user

pytestmark = pytest.mark.slow


class Stream:
    """One event stream read line by line from a raw socket."""

    def __init__(self, server: Server, query: str = "", headers: dict[str, str] | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.sock.sendall(f"GET /api/v1/stream?{query} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n"
                          f"{extra}\r\n".encode())
        self.buffer = b""
        head = self._until(b"\r\n\r\n")
        self.status = int(head.split(b" ", 2)[1])
        self.headers = head.decode("latin-1").lower()
        self.chunked = "transfer-encoding: chunked" in self.headers

    def _until(self, mark: bytes) -> bytes:
        while mark not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("the stream ended")
            self.buffer += data
        head, self.buffer = self.buffer.split(mark, 1)
        return head

    def body(self) -> Any:
        return json.loads(self.buffer or self.sock.recv(65536))

    def _text(self) -> str:
        if not self.chunked:
            return self._until(b"\n\n").decode() + "\n\n"
        size = int(self._until(b"\r\n"), 16)
        while len(self.buffer) < size + 2:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("the stream ended")
            self.buffer += data
        chunk, self.buffer = self.buffer[:size], self.buffer[size + 2:]
        if size == 0:
            raise EOFError("the stream ended")
        return chunk.decode()

    def event(self, timeout: float = 10.0) -> dict[str, Any]:
        """The next event (comments skipped): {"id", "event", "data"}."""
        self.sock.settimeout(timeout)
        while True:
            for block in self._text().split("\n\n"):
                fields: dict[str, Any] = {}
                for line in block.splitlines():
                    if line.startswith(":") or not line:
                        continue
                    name, _, value = line.partition(": ")
                    fields[name] = json.loads(value) if name == "data" else value
                if "event" in fields:
                    return fields

    def until(self, name: str, data: Any) -> list[dict[str, Any]]:
        got = []
        while (e := self.event())["event"] != name or e["data"] != data:
            got.append(e)
        return got

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def server(postgres: Any, tmp_path_factory: Any) -> Iterator[Server]:
    srv = start_gunicorn(base_env(postgres, ORGCAST_PING_INTERVAL="1"), tmp_path_factory.mktemp("stream"))
    yield srv
    srv.stop()


@pytest.fixture
def streams() -> Iterator[Any]:
    opened: list[Stream] = []

    def open_stream(server: Server, query: str = "", **headers: str) -> Stream:
        stream = Stream(server, query, {k.replace("_", "-"): v for k, v in headers.items()})
        opened.append(stream)
        return stream

    yield open_stream
    for stream in opened:
        stream.close()


@pytest.mark.parametrize(("query", "headers", "status", "code"), [
    ("organizationId=org-a", {}, 401, "token_missing"),
    ("organizationId=org-a&token=nope", {}, 401, "token_invalid"),
    ("organizationId=org-a&token=tok-expired", {}, 401, "token_expired"),
    ("organizationId=org-b&token=tok-bob", {}, 403, "forbidden"),
    ("organizationId=bad%20id&token=tok-bob", {}, 422, "organization_invalid"),
    ("organizationId=org-a", {"Authorization": "Bearer nope"}, 401, "token_invalid"),
])
def test_refusals_are_json_before_the_stream(server: Server, streams: Any, query: str, headers: dict[str, str],
                                             status: int, code: str) -> None:
    stream = streams(server, query, **headers)
    assert stream.status == status
    assert stream.body()["error"]["code"] == code


def test_events_of_the_rooms_with_resumable_ids(server: Server, streams: Any) -> None:
    stream = streams(server, "organizationId=org-a&token=tok-bob")
    assert stream.status == 200 and "text/event-stream" in stream.headers
    values = [unique("sse") for _ in range(3)]
    for value in values:
        assert publish(server, "org-a", "news", {"v": value}).status_code == 202
    assert publish(server, "org-b", "news", "not bob's").status_code == 202
    requests.post(f"{server.url}/api/v1/users/bob/events", json={"event": "news", "data": "bob's"},
                  headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5)
    got = [stream.event() for _ in range(4)]
    assert [e["data"] for e in got] == [{"v": v} for v in values] + ["bob's"]
    assert all(e["event"] == "news" and e["id"].isdigit() for e in got)
    ids = [int(e["id"]) for e in got]
    assert ids == sorted(ids)
    stream.close()
    missed = [unique("missed") for _ in range(2)]
    for value in missed:
        assert publish(server, "org-a", "news", value).status_code == 202
    again = streams(server, "organizationId=org-a", Authorization="Bearer tok-bob", Last_Event_ID=str(ids[2]))
    assert again.status == 200
    assert [e["data"] for e in [again.event() for _ in range(3)]] == ["bob's", *missed]


def test_a_position_too_old_gets_resync_first(postgres: Any, gunicorn_factory: Any, streams: Any) -> None:
    small = gunicorn_factory(base_env(postgres, ORGCAST_RECOVERY_WINDOW="1"))
    first = streams(small, "organizationId=org-a&token=tok-bob")
    assert publish(small, "org-a", "news", "seen").status_code == 202
    seen = first.event()
    first.close()
    assert publish(small, "org-a", "news", "missed").status_code == 202
    time.sleep(1.5)  # what it missed is older than the window (1 s) now
    again = streams(small, f"organizationId=org-a&token=tok-bob&lastEventId={seen['id']}")
    assert again.event() == {"event": "resync", "data": {}}
    assert publish(small, "org-a", "news", "live").status_code == 202
    assert again.until("news", "live") == []


def test_through_the_readme_nginx(server: Server, tmp_path: Any) -> None:
    from test_nginx import start_nginx

    nginx = start_nginx(tmp_path / "nginx", server.port)
    try:
        with requests.get(f"{nginx.url}/api/v1/stream?organizationId=org-a&token=tok-bob", stream=True,
                          timeout=10) as reply:
            assert reply.status_code == 200
            value = unique("via-nginx")
            assert publish(server, "org-a", "news", value).status_code == 202
            lines = reply.iter_lines(decode_unicode=True)
            for line in lines:
                if line.startswith("data: ") and value in line:
                    break
    finally:
        nginx.stop()


def test_heartbeat_comments_keep_an_idle_stream(server: Server) -> None:
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    raw.sendall(b"GET /api/v1/stream?organizationId=org-a&token=tok-bob HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    started = time.monotonic()
    while data.count(b": ping") < 2:  # ORGCAST_PING_INTERVAL=1: one a second, each on time
        chunk = raw.recv(65536)
        assert chunk, data
        data += chunk
    raw.close()
    assert time.monotonic() - started < 4, "two heartbeats took more than 4 s at one a second"


def test_a_revoked_membership_ends_the_stream(postgres: Any, server: Server, streams: Any) -> None:
    user, token = new_user(postgres, 3600, ("org-a",))
    stream = streams(server, f"organizationId=org-a&token={token}")
    assert stream.status == 200
    postgres.psql(f"DELETE FROM organization_users WHERE user_id = '{user}'")
    reply = requests.post(f"{server.url}/api/v1/organizations/org-a/users/{user}/revoke",
                          headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5)
    assert reply.status_code == 202
    assert stream.event() == {"event": "revoked", "data": {"code": "forbidden", "organizationId": "org-a"}}
    with pytest.raises(EOFError):
        stream.event(timeout=10)


def test_the_token_in_the_query_is_not_in_the_access_log(server: Server, streams: Any) -> None:
    stream = streams(server, "organizationId=org-a&token=tok-bob")
    assert stream.status == 200
    stream.close()
    deadline = time.monotonic() + 5
    while "/api/v1/stream" not in server.output():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert "tok-bob" not in server.output()


def test_a_stream_resumes_on_another_worker_after_its_own_was_killed(postgres: Any, tmp_path: Any,
                                                                     streams: Any) -> None:
    import os
    import re
    import signal

    server = start_gunicorn(base_env(postgres, ORGCAST_LOG_LEVEL="debug", WEB_CONCURRENCY="2"), tmp_path)
    try:
        stream = streams(server, "organizationId=org-a&token=tok-bob")
        assert publish(server, "org-a", "news", "seen").status_code == 202
        seen = stream.event()
        deadline = time.monotonic() + 5
        while not (found := re.findall(r"\[(\d+)\] \[DEBUG\] app\.http\.stream: event stream", server.output())):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(int(found[-1]), signal.SIGKILL)
        with pytest.raises((EOFError, OSError)):
            stream.event(timeout=10)
        missed = [unique("killed") for _ in range(3)]
        for value in missed:
            assert publish(server, "org-a", "news", value).status_code == 202
        again = streams(server, "organizationId=org-a&token=tok-bob", Last_Event_ID=seen["id"])
        assert again.status == 200
        assert [again.event()["data"] for _ in range(3)] == missed
    finally:
        server.stop()


def test_a_reader_that_never_reads_is_cut_off_and_the_others_are_not(postgres: Any, tmp_path: Any,
                                                                    streams: Any) -> None:
    from test_metrics import scrape, value

    server = start_gunicorn(base_env(postgres, ORGCAST_SEND_BUFFER="65536"), tmp_path)
    try:
        stuck = socket.socket()
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.connect(("127.0.0.1", server.port))
        stuck.sendall(b"GET /api/v1/stream?organizationId=org-a&token=tok-bob HTTP/1.1\r\nHost: x\r\n\r\n")
        reader = streams(server, "organizationId=org-a&token=tok-alice")
        big = "x" * 60_000
        # The stuck stream's kernel buffers and 64 KiB of backlog fill within a few events;
        # the reader gets every one, and the stuck stream is cut as a slow consumer.
        deadline = time.monotonic() + 20
        sent = 0
        while "closing an event stream that does not read" not in server.output():
            assert time.monotonic() < deadline, "\n".join(
                line for line in server.output().splitlines() if "big" not in line and "POST" not in line)
            assert publish(server, "org-a", "big", {"n": sent, "pad": big}).status_code == 202
            assert reader.event()["data"]["n"] == sent
            sent += 1
        assert value(scrape(server)[0], "orgcast_slow_consumers_disconnected_total") >= 1
        assert publish(server, "org-a", "news", "after").status_code == 202
        assert reader.until("news", "after") == []
        # What the stuck one had, it gets; then the end, not a hang.
        stuck.settimeout(10)
        while stuck.recv(65536):
            pass
        stuck.close()
    finally:
        server.stop()


def test_a_closed_stream_frees_its_place_at_once(postgres: Any, tmp_path: Any, streams: Any) -> None:
    """The end of a stream is seen by the worker as it happens (no write needed): the per-user
    limit counts Socket.IO sockets and streams together, and a stream that was closed by its
    client leaves room for the next one, and leaves presence and the sockets gauge."""
    from test_metrics import scrape, value

    server = start_gunicorn(base_env(postgres, ORGCAST_MAX_SOCKETS_PER_USER="2"), tmp_path)
    try:
        first = streams(server, "organizationId=org-a&token=tok-bob")
        second = streams(server, "organizationId=org-a&token=tok-bob")
        assert (first.status, second.status) == (200, 200)
        refused = streams(server, "organizationId=org-a&token=tok-bob")
        assert (refused.status, refused.body()["error"]["code"]) == (429, "too_many_sockets")
        reply = requests.get(f"{server.url}/api/v1/organizations/org-a/presence",
                             headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5)
        assert {"userId": "bob", "sockets": 2} in reply.json()["users"]
        assert value(scrape(server)[0], "orgcast_connected_sockets") == 2
        first.close()
        deadline = time.monotonic() + 5
        while value(scrape(server)[0], "orgcast_connected_sockets") != 1:
            assert time.monotonic() < deadline, "the closed stream is still counted"
            time.sleep(0.05)
        again = streams(server, "organizationId=org-a&token=tok-bob")
        assert again.status == 200
        assert publish(server, "org-a", "news", "to-both").status_code == 202
        assert second.until("news", "to-both") == [] and again.until("news", "to-both") == []
    finally:
        server.stop()


@pytest.mark.parametrize("bus", ["postgres", "redis"])
def test_streams_on_two_workers_get_every_event_once_in_order(bus: str, postgres: Any, redis_server: Any,
                                                              tmp_path: Any, streams: Any) -> None:
    env = base_env(postgres, WEB_CONCURRENCY="2", **({"REDIS_URL": redis_server.url} if bus == "redis" else {}))
    server = start_gunicorn(env, tmp_path)
    try:
        opened = [streams(server, f"organizationId=org-a&token={token}")
                  for token in ("tok-bob", "tok-alice") * 3]
        assert all(stream.status == 200 for stream in opened)
        values = [unique(f"{bus}-{n}") for n in range(20)]
        for value in values:
            assert publish(server, "org-a", "news", value).status_code == 202
        for stream in opened:
            got = [stream.event() for _ in values]
            assert [e["data"] for e in got] == values
            assert [int(e["id"]) for e in got] == sorted(int(e["id"]) for e in got)
            assert len({e["id"] for e in got}) == len(values)
        reply = requests.get(f"{server.url}/api/v1/organizations/org-a/presence",
                             headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5)
        assert {"userId": "bob", "sockets": 3} in reply.json()["users"]
    finally:
        server.stop()
