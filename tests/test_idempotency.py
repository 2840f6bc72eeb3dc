"""Idempotent publish (contract §5.4, issue 20): a key accepted for a room within
ORGCAST_IDEMPOTENCY_WINDOW, on any worker, on either bus, is answered as the first plus
``"duplicate": true`` and delivered to no one; the check and the append are one step."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from cluster import running
from conftest import API_KEY, Server, base_env, unique

pytestmark = pytest.mark.slow


def post(server: Server, path: str, body: dict[str, Any], key: str | None) -> requests.Response:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    if key is not None:
        headers["Idempotency-Key"] = key
    return requests.post(f"{server.url}/api/v1/{path}", json=body, headers=headers, timeout=10)


def news(listener: Any, marker: str) -> list[Any]:
    return [data for name, data in listener.events_before("marker", marker, timeout=15) if name == "news"]


@pytest.mark.parametrize("bus", ["postgres", "redis"])
def test_the_same_key_through_two_workers_at_once_is_delivered_once(bus: str, postgres: Any, redis_server: Any,
                                                                    tmp_path: Path, listen: Any) -> None:
    env = base_env(postgres)
    if bus == "redis":
        env["REDIS_URL"] = redis_server.url
    with running(env, tmp_path, [2, 1]) as cluster:
        listener = listen(cluster.servers[0].url, auth={"token": "tok-bob", "organizationId": "org-a"})
        for attempt in range(3):
            key = unique("key")
            replies: list[requests.Response] = []
            start = threading.Barrier(6)

            def send(server: Server, key: str = key, attempt: int = attempt, start: Any = start,
                     replies: list[requests.Response] = replies) -> None:
                start.wait(10)
                replies.append(post(server, "organizations/org-a/events",
                                    {"event": "news", "data": f"once-{attempt}"}, key))

            threads = [threading.Thread(target=send, args=(cluster.servers[i % 2],)) for i in range(6)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(15)
            assert [r.status_code for r in replies] == [202] * 6
            bodies = [r.json() for r in replies]
            assert sum(1 for b in bodies if not b.get("duplicate")) == 1
            assert all(b["room"] == "organization.org-a" and b["status"] == "accepted" for b in bodies)
        marker = unique("m")
        assert post(cluster.servers[1], "organizations/org-a/events", {"event": "marker", "data": marker},
                    None).status_code == 202
        assert news(listener, marker) == ["once-0", "once-1", "once-2"]


def test_the_key_is_per_room_expires_after_the_window_and_keys_batches(postgres: Any, gunicorn_factory: Any,
                                                                       listen: Any) -> None:
    server = gunicorn_factory(base_env(postgres, ORGCAST_IDEMPOTENCY_WINDOW="1"))
    listener = listen(server.url, auth={"token": "tok-dave", "organizationId": "org-a"})
    assert listener.client.call("subscribe", {"organizationId": "org-b"}, timeout=10)["ok"] is True
    key = unique("key")
    assert "duplicate" not in post(server, "organizations/org-a/events", {"event": "news", "data": 1}, key).json()
    assert post(server, "organizations/org-a/events", {"event": "news", "data": 2}, key).json()["duplicate"] is True
    # The same key for another room is another publish.
    assert "duplicate" not in post(server, "organizations/org-b/events", {"event": "news", "data": 3}, key).json()
    time.sleep(1.2)  # the window is 1 s: past it, the key is new again
    assert "duplicate" not in post(server, "organizations/org-a/events", {"event": "news", "data": 4}, key).json()
    batch = {"events": [{"organizationId": "org-a", "event": "news", "data": 5, "idempotencyKey": "b-1"},
                        {"organizationId": "org-a", "event": "news", "data": 6, "idempotencyKey": "b-1"},
                        {"organizationId": "org-a", "event": "news", "data": 7}]}
    first = post(server, "events", batch, None).json()
    assert first == {"status": "accepted", "count": 3, "duplicates": 1}
    again = post(server, "events", {"events": batch["events"][:2]}, None).json()
    assert again == {"status": "accepted", "count": 2, "duplicates": 2, "duplicate": True}
    marker = unique("m")
    assert post(server, "organizations/org-a/events", {"event": "marker", "data": marker}, None).status_code == 202
    assert news(listener, marker) == [1, 3, 4, 5, 7]


@pytest.mark.parametrize("key", ["x" * 65, "has space", "é", "a/b"])
def test_a_bad_key_is_refused_with_its_code(gunicorn_server: Server, key: str) -> None:
    reply = post(gunicorn_server, "organizations/org-a/events", {"event": "news"}, key)
    assert reply.status_code == 422 and reply.json()["error"]["code"] == "invalid_idempotency_key"


def test_a_key_of_64_characters_is_accepted(gunicorn_server: Server) -> None:
    import secrets

    key = "k" * 56 + secrets.token_hex(4)
    assert post(gunicorn_server, "organizations/org-a/events", {"event": "news"}, key).status_code == 202


def test_pg_notify_takes_an_idempotency_key(postgres: Any, gunicorn_server: Server, listen: Any) -> None:
    listener = listen(gunicorn_server.url, auth={"token": "tok-bob", "organizationId": "org-a"})
    key = unique("sqlkey")
    for n in (1, 2):
        postgres.psql(f"""SELECT pg_notify('orgcast', '{{"room": "organization.org-a", "event": "news", """
                      f""""data": {n}, "idempotencyKey": "{key}"}}')""")
    marker = unique("m")
    assert post(gunicorn_server, "organizations/org-a/events", {"event": "marker", "data": marker},
                None).status_code == 202
    assert news(listener, marker) == [1]
