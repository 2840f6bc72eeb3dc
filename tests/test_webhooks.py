"""Webhooks of who comes and goes (contract §5.5, issue 19), read and verified by the real Pusher
library (``pusher.Pusher(...).validate_webhook``), sent by real gunicorn workers to a receiver
of the test's own: first, second and last socket, a reload within the linger, a receiver that
answers 500 twice, two instances sending each change once."""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pusher
import pytest
from cluster import running
from conftest import base_env
from test_lifecycle import new_user
from throwaway import free_port

pytestmark = pytest.mark.slow

KEY, SECRET = "hook-key", "hook-secret-0123456789"


class Receiver:
    """An HTTP receiver that answers ``failures`` 500s first, then 200, and keeps what Pusher validates."""

    def __init__(self, failures: int = 0) -> None:
        self.port = free_port()
        self.failures = failures
        self.bodies: queue.Queue[dict[str, Any]] = queue.Queue()
        self.posts = 0
        self.invalid = 0
        client = pusher.Pusher(app_id="1", key=KEY, secret=SECRET)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.posts += 1
                if receiver.failures > 0:
                    receiver.failures -= 1
                    self.send_response(500)
                    self.end_headers()
                    return
                valid = client.validate_webhook(self.headers.get("X-Pusher-Key", ""),
                                                self.headers.get("X-Pusher-Signature", ""), body.decode())
                if valid is None:
                    receiver.invalid += 1
                else:
                    receiver.bodies.put(valid)
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def events(self, count: int, timeout: float = 20.0) -> list[dict[str, Any]]:
        """The next ``count`` events, in the order they came."""
        got: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"only {got} within {timeout} s"
            try:
                got.extend(self.bodies.get(timeout=remaining)["events"])
            except queue.Empty:
                continue
        return got

    def quiet(self, seconds: float) -> list[dict[str, Any]]:
        """Whatever arrives within ``seconds`` (the linger and a margin: nothing, when nothing is due)."""
        got: list[dict[str, Any]] = []
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                got.extend(self.bodies.get(timeout=remaining)["events"])
            except queue.Empty:
                break
        return got

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def hook_env(postgres: Any, url: str, **more: str) -> dict[str, str]:
    return base_env(postgres, ORGCAST_WEBHOOK_URL=url, ORGCAST_WEBHOOK_KEY=KEY, ORGCAST_WEBHOOK_SECRET=SECRET,
                    ORGCAST_WEBHOOK_LINGER="1", **more)


def organization(events: list[dict[str, Any]], org: str) -> list[tuple[str, str | None]]:
    channel = f"organization.{org}"
    return [(e["name"], e.get("user_id")) for e in events if e["channel"] == channel]


@pytest.mark.parametrize("bus", ["postgres", "redis"])
def test_first_second_and_last_socket_and_a_reload(bus: str, postgres: Any, redis_server: Any, receiver: Receiver,
                                                   tmp_path: Path, listen: Any) -> None:
    more = {"REDIS_URL": redis_server.url} if bus == "redis" else {}
    org = f"hooks-{bus}"
    user, token = new_user(postgres, 3600, (org,))
    with running(hook_env(postgres, receiver.url, **more), tmp_path, [2, 1]) as cluster:
        auth = {"token": token, "organizationId": org}
        first = listen(cluster.servers[0].url, auth=auth)
        assert organization(receiver.events(2), org) == [("channel_occupied", None), ("member_added", user)]
        second = listen(cluster.servers[1].url, auth=auth)
        second.close()
        first.close()
        # A reload: back within the linger (1 s), on another instance: nothing to say.
        again = listen(cluster.servers[1].url, auth=auth)
        assert organization(receiver.quiet(2.5), org) == []
        again.close()
        assert organization(receiver.events(2), org) == [("member_removed", user), ("channel_vacated", None)]
        assert organization(receiver.quiet(2), org) == []  # each change once, whatever the workers
    assert receiver.invalid == 0


def test_a_receiver_that_fails_twice_gets_the_events_in_order(postgres: Any, tmp_path: Path, listen: Any) -> None:
    receiver = Receiver(failures=2)
    try:
        org = "hooks-retry"
        user, token = new_user(postgres, 3600, (org,))
        with running(hook_env(postgres, receiver.url), tmp_path, [1]) as cluster:
            listen(cluster.servers[0].url, auth={"token": token, "organizationId": org})
            assert organization(receiver.events(2, timeout=20), org) == [("channel_occupied", None),
                                                                        ("member_added", user)]
            assert receiver.posts >= 3
            assert "webhooks: the receiver did not take a batch" in cluster.servers[0].output()
    finally:
        receiver.close()


def test_the_signature_is_the_hex_hmac_of_the_raw_body() -> None:
    from app.realtime.webhooks import signature

    body = json.dumps({"time_ms": int(time.time() * 1000), "events": []}).encode()
    assert pusher.Pusher(app_id="1", key=KEY, secret=SECRET).validate_webhook(
        KEY, signature(SECRET, body), body.decode()) is not None


@pytest.mark.parametrize("missing", ["ORGCAST_WEBHOOK_KEY", "ORGCAST_WEBHOOK_SECRET"])
def test_a_webhook_url_without_its_key_or_secret_stops_start_up(postgres: Any, missing: str) -> None:
    from app.config import ConfigError, load_settings

    env = hook_env(postgres, "http://127.0.0.1:9/hook")
    del env[missing]
    with pytest.raises(ConfigError, match=missing):
        load_settings(env)
    with pytest.raises(ConfigError, match="ORGCAST_WEBHOOK_URL"):
        load_settings({**hook_env(postgres, "ftp://x"), })


def test_an_event_stream_comes_and_goes_like_a_socket(postgres: Any, receiver: Receiver, tmp_path: Path,
                                                      listen: Any) -> None:
    """Contract §4.2: an SSE stream counts in the webhooks as a Socket.IO socket does, and
    one user's stream and socket together are one member."""
    from conftest import start_gunicorn
    from test_stream import Stream

    org = "hooks-sse"
    user, token = new_user(postgres, 3600, (org,))
    server = start_gunicorn(hook_env(postgres, receiver.url), tmp_path)
    try:
        stream = Stream(server, f"organizationId={org}&token={token}")
        assert stream.status == 200
        assert organization(receiver.events(2), org) == [("channel_occupied", None), ("member_added", user)]
        socket_too = listen(server.url, auth={"token": token, "organizationId": org})
        stream.close()  # the socket stays: the member stays
        assert organization(receiver.quiet(2.5), org) == []
        socket_too.close()
        assert organization(receiver.events(2), org) == [("member_removed", user), ("channel_vacated", None)]
    finally:
        server.stop()
    assert receiver.invalid == 0
