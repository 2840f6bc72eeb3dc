"""Presence: GET /api/v1/organizations/<id>/presence and /users/<id>/presence
across 4 workers and across 2 instances, on each bus; presence.join / leave
exactly once per user transition; a killed worker's users leave; a stopped
worker makes the answer partial instead of hanging it."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from cluster import Cluster, running
from conftest import API_KEY, Listener, Server, base_env, publish, unique

pytestmark = pytest.mark.slow

AUTH = {"Authorization": f"Bearer {API_KEY}"}
ALICE = {"token": "tok-alice", "organizationId": "org-a"}
BOB = {"token": "tok-bob", "organizationId": "org-a"}
DAVE_B = {"token": "tok-dave", "organizationId": "org-b"}


def presence(server: Server, path: str) -> dict[str, Any]:
    reply = requests.get(f"{server.url}/api/v1/{path}/presence", headers=AUTH, timeout=10)
    assert reply.status_code == 200, reply.text
    body: dict[str, Any] = reply.json()
    return body


def wait_presence(server: Server, path: str, check: Any, timeout: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body = presence(server, path)
        if check(body):
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.05)


def users(body: dict[str, Any]) -> dict[str, int]:
    return {u["userId"]: u["sockets"] for u in body["users"]}


@pytest.fixture(params=["postgres-4-workers", "postgres-2-instances", "redis-4-workers", "redis-2-instances"])
def deployment(request: pytest.FixtureRequest, postgres: Any, redis_server: Any, tmp_path: Path) -> Iterator[Cluster]:
    bus, shape = request.param.split("-", 1)
    env = base_env(postgres, **({"REDIS_URL": redis_server.url} if bus == "redis" else {}))
    with running(env, tmp_path, [4] if shape == "4-workers" else [2, 2]) as found:
        yield found


def test_presence_counts_every_socket_on_every_worker(deployment: Cluster, listen: Any) -> None:
    alice = deployment.spread(listen, ALICE)  # one on each worker: 4 sockets
    bob = deployment.spread(listen, BOB)
    for extra, _, _ in bob[2:]:
        extra.close()
    bob = bob[:2]
    dave = listen(deployment.servers[0].url, auth=DAVE_B)
    assert dave.client.call("subscribe", {"organizationId": "org-a"}, timeout=5)["ok"] is True
    asked = deployment.servers[-1]

    body = wait_presence(asked, "organizations/org-a", lambda b: b["socketCount"] == 7)
    assert body == {"organizationId": "org-a", "users": [{"userId": "alice", "sockets": 4},
                                                         {"userId": "bob", "sockets": 2},
                                                         {"userId": "dave", "sockets": 1}],
                    "userCount": 3, "socketCount": 7, "partial": False}
    assert presence(asked, "organizations/org-b")["users"] == [{"userId": "dave", "sockets": 1}]
    # One socket in two organizations counts once for the user.
    assert presence(asked, "users/dave") == {
        "userId": "dave", "organizations": [{"organizationId": "org-a", "sockets": 1},
                                            {"organizationId": "org-b", "sockets": 1}],
        "socketCount": 1, "partial": False}
    assert presence(asked, "users/alice")["organizations"] == [{"organizationId": "org-a", "sockets": 4}]

    # Right within a second of a disconnect (and of an unsubscribe), wherever the socket was.
    alice[0][0].close()
    assert dave.client.call("unsubscribe", {"organizationId": "org-a"}, timeout=5)["ok"] is True
    body = wait_presence(asked, "organizations/org-a", lambda b: b["socketCount"] == 5, timeout=1.0)
    assert users(body) == {"alice": 3, "bob": 2}
    for listener, _, _ in bob:
        listener.close()
    body = wait_presence(asked, "organizations/org-a", lambda b: "bob" not in users(b), timeout=1.0)
    assert users(body) == {"alice": 3}


def test_nobody_connected_answers_an_empty_list(gunicorn_server: Server) -> None:
    organization = unique("org")
    assert presence(gunicorn_server, f"organizations/{organization}") == {
        "organizationId": organization, "users": [], "userCount": 0, "socketCount": 0, "partial": False}
    assert presence(gunicorn_server, "users/nobody-here") == {
        "userId": "nobody-here", "organizations": [], "socketCount": 0, "partial": False}


@pytest.mark.parametrize(("path", "method", "headers", "status", "code"), [
    ("organizations/org-a/presence", "GET", {}, 401, "unauthorized"),
    ("organizations/org-a/presence", "GET", {"Authorization": "Bearer wrong"}, 401, "unauthorized"),
    ("organizations/not%20valid/presence", "GET", AUTH, 422, "invalid_organization"),
    ("organizations/" + "x" * 65 + "/presence", "GET", AUTH, 422, "invalid_organization"),
    ("users/not%20valid/presence", "GET", AUTH, 422, "invalid_user"),
    ("users/alice/presence", "POST", AUTH, 405, "method_not_allowed"),
    ("users/alice/presence/extra", "GET", AUTH, 404, "not_found"),
])
def test_presence_errors_are_json(gunicorn_server: Server, path: str, method: str, headers: dict[str, str],
                                  status: int, code: str) -> None:
    reply = requests.request(method, f"{gunicorn_server.url}/api/v1/{path}", headers=headers, timeout=5)
    assert reply.status_code == status
    assert reply.headers["Content-Type"].startswith("application/json")
    assert reply.json()["error"]["code"] == code


# --- presence.join / presence.leave ---------------------------------------------------------------


def presence_events(listener: Listener, server: Server) -> list[tuple[str, Any]]:
    """The presence events ``listener`` received until a marker published now (the barrier)."""
    marker = unique("marker")
    assert publish(server, "org-a", "marker", marker).status_code == 202
    return [(name, data) for name, data in listener.events_before("marker", marker, timeout=10)
            if name.startswith("presence.")]


@pytest.fixture(params=["postgres", "redis"])
def with_events(request: pytest.FixtureRequest, postgres: Any, redis_server: Any, tmp_path: Path) -> Iterator[Cluster]:
    env = base_env(postgres, ORGCAST_PRESENCE_EVENTS="true",
                   **({"REDIS_URL": redis_server.url} if request.param == "redis" else {}))
    with running(env, tmp_path, [2, 2]) as found:
        yield found


def test_join_and_leave_once_per_user_whatever_its_sockets(with_events: Cluster, listen: Any) -> None:
    server = with_events.servers[0]
    bob = listen(server.url, auth=BOB)
    # Five tabs of alice, on every worker of both instances.
    tabs = [listener for listener, _, _ in with_events.spread(listen, ALICE)]
    tabs.append(listen(with_events.servers[1].url, auth=ALICE))
    # wait until the last transition is applied: the store writes are asynchronous
    deadline = time.monotonic() + 5
    seen: list[tuple[str, Any]] = []
    while not seen:
        seen = presence_events(bob, server)
        assert time.monotonic() < deadline, "no presence.join"
    assert seen == [("presence.join", {"organizationId": "org-a", "userId": "alice"})]
    assert presence_events(bob, server) == []
    # alice is not told of her own join
    assert all(presence_events(tab, server) == [] for tab in tabs)

    for tab in tabs[:-1]:
        tab.close()
    assert presence_events(bob, server) == []  # one tab left: no leave
    tabs[-1].close()
    assert bob.wait_for("presence.leave", timeout=5) == {"organizationId": "org-a", "userId": "alice"}
    assert presence_events(bob, server) == []


def test_subscribe_and_unsubscribe_count_like_connect_and_disconnect(with_events: Cluster, listen: Any) -> None:
    server = with_events.servers[1]
    bob = listen(server.url, auth=BOB)
    dave = listen(with_events.servers[0].url, auth=DAVE_B)
    assert dave.client.call("subscribe", {"organizationId": "org-a"}, timeout=5)["ok"] is True
    assert bob.wait_for("presence.join", timeout=5) == {"organizationId": "org-a", "userId": "dave"}
    assert dave.client.call("unsubscribe", {"organizationId": "org-a"}, timeout=5)["ok"] is True
    assert bob.wait_for("presence.leave", timeout=5) == {"organizationId": "org-a", "userId": "dave"}
    assert dave.client.connected  # still in org-b
    assert presence_events(bob, server) == []


def test_no_presence_event_when_the_setting_is_off(postgres: Any, gunicorn_factory: Any, listen: Any) -> None:
    server = gunicorn_factory(base_env(postgres, WEB_CONCURRENCY="2"))
    bob = listen(server.url, auth=BOB)
    alice = listen(server.url, auth=ALICE)
    assert users(wait_presence(server, "organizations/org-a", lambda b: b["socketCount"] == 2)) == {
        "alice": 1, "bob": 1}
    alice.close()
    wait_presence(server, "organizations/org-a", lambda b: b["socketCount"] == 1)
    assert presence_events(bob, server) == []


def test_a_killed_workers_users_leave_within_the_ping_timeout(with_events: Cluster, listen: Any) -> None:
    # alice only on one worker of instance 0; bob watching from instance 1.
    server, other = with_events.servers
    placed = with_events.spread(listen, ALICE)
    victim = next(pid for _, s, pid in placed if s is server)
    for listener, _, pid in placed:
        if pid != victim:
            listener.close()
    bob = listen(other.url, auth=BOB)
    wait_presence(other, "organizations/org-a", lambda b: users(b) == {"alice": 1, "bob": 1})
    presence_events(bob, other)  # alice's join, whenever it was sent

    os.kill(victim, signal.SIGKILL)
    started = time.monotonic()
    # The route leaves it out at once (partial while the others still expect it) ...
    body = wait_presence(other, "organizations/org-a", lambda b: "alice" not in users(b), timeout=3)
    assert users(body) == {"bob": 1}
    # ... and the leave comes within the ping timeout (20 s), once.
    assert bob.wait_for("presence.leave", timeout=20) == {"organizationId": "org-a", "userId": "alice"}
    assert time.monotonic() - started < 20
    assert presence_events(bob, other) == []
    assert not presence(other, "organizations/org-a")["partial"]


def test_a_stopped_worker_makes_the_answer_partial(deployment: Cluster, listen: Any) -> None:
    placed = deployment.spread(listen, ALICE)
    asked = deployment.servers[0]
    wait_presence(asked, "organizations/org-a", lambda b: b["socketCount"] == 4)
    victim = next(pid for _, s, pid in placed if s is deployment.servers[-1])
    os.kill(victim, signal.SIGSTOP)
    try:
        started = time.monotonic()
        body = presence(asked, "organizations/org-a")
        assert time.monotonic() - started < 3  # bounded by ORGCAST_CLUSTER_TIMEOUT (1 s)
        assert body["partial"] is True and body["socketCount"] == 3
        assert presence(asked, "users/alice")["partial"] is True
    finally:
        os.kill(victim, signal.SIGCONT)
    wait_presence(asked, "organizations/org-a", lambda b: not b["partial"] and b["socketCount"] == 4)
