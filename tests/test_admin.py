"""/admin/stats: every worker of every instance, summed, over each bus; the key;
and a stopped worker left out (``partial``) instead of hanging the route."""

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
from conftest import API_KEY, Server, base_env, publish

pytestmark = pytest.mark.slow

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def stats(server: Server) -> dict[str, Any]:
    reply = requests.get(f"{server.url}/admin/stats", headers=AUTH, timeout=10)
    assert reply.status_code == 200, reply.text
    body: dict[str, Any] = reply.json()
    return body


@pytest.mark.parametrize("path", ["/admin/stats", "/admin/config"])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-key"}, {"Authorization": "Basic eDp5"}])
def test_admin_routes_refuse_without_the_key(gunicorn_server: Server, path: str, headers: dict[str, str]) -> None:
    reply = requests.get(gunicorn_server.url + path, headers=headers, timeout=5)
    assert reply.status_code == 401
    assert reply.headers["Content-Type"].startswith("application/json")
    assert reply.json()["error"]["code"] == "unauthorized"


def test_the_status_page_is_served_without_data_or_key(gunicorn_server: Server) -> None:
    reply = requests.get(gunicorn_server.url + "/admin", timeout=5)
    assert reply.status_code == 200 and reply.headers["Content-Type"].startswith("text/html")
    assert "/admin/stats" in reply.text and API_KEY not in reply.text
    assert "http://" not in reply.text.replace("http://www.w3.org/2000/svg", "")  # no CDN


@pytest.fixture(params=["postgres", "redis"])
def two_instances(request: pytest.FixtureRequest, postgres: Any, redis_server: Any,
                  tmp_path: Path) -> Iterator[Cluster]:
    env = base_env(postgres, **({"REDIS_URL": redis_server.url} if request.param == "redis" else {}))
    with running(env, tmp_path, [2, 2]) as found:
        yield found


def wait_stats(server: Server, check: Any, timeout: float = 10.0) -> dict[str, Any]:
    """Stats once ``check(stats)`` holds (workers learn of each other within a heartbeat)."""
    deadline = time.monotonic() + timeout
    while True:
        body = stats(server)
        if check(body):
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.1)


def test_stats_sum_every_worker_of_every_instance(two_instances: Cluster, listen: Any) -> None:
    placed = two_instances.spread(listen, {"token": "tok-alice", "organizationId": "org-a"})
    placed += two_instances.spread(listen, {"token": "tok-carol", "organizationId": "org-b"}, per_worker=1)
    assert publish(two_instances.servers[0], "org-a", "news", "x").status_code == 202
    for listener, _, _ in placed[:4]:
        assert listener.wait_for("news") == "x"
    ours = {pid for s in two_instances.servers for pid in two_instances.worker_pids(s)}

    def mine(b: dict[str, Any]) -> list[dict[str, Any]]:
        # (Another test's server on the same database is part of the deployment too.)
        return [w for w in b["workers"] if w["pid"] in ours]

    # (The leader may be changing hands for a second: an earlier test's server on this database
    # that held the lock has just stopped.)
    body = wait_stats(two_instances.servers[1], lambda b: len(mine(b)) == 4 and b["sockets"] == 8
                      and b["bus"]["leader"] is not None)
    assert body["partial"] is False
    assert all(w["sockets"] == 2 and w["answer_ms"] is not None for w in mine(body))
    assert {"organizationId": "org-a", "sockets": 4} in body["organizations"]
    assert {"organizationId": "org-b", "sockets": 4} in body["organizations"]
    assert body["bus"]["workers_up"] >= 4 and body["bus"]["leader"] is not None
    assert body["counts"]["published"] >= 1 and body["counts"]["delivered"] >= 4
    assert body["attempts"]["ok"] >= 8
    assert body["auth"]["cache_hit_rate"] is not None


def test_a_stopped_worker_is_left_out_and_does_not_hang_the_route(two_instances: Cluster, listen: Any) -> None:
    placed = two_instances.spread(listen, {"token": "tok-alice", "organizationId": "org-a"})
    asked = two_instances.servers[0]
    ours = {pid for s in two_instances.servers for pid in two_instances.worker_pids(s)}
    wait_stats(asked, lambda b: ours <= {w["pid"] for w in b["workers"]})
    # Stop a worker of the other instance (one of this instance's may serve the route).
    _, _, victim = next(p for p in placed if p[1] is two_instances.servers[1])
    os.kill(victim, signal.SIGSTOP)
    try:
        started = time.monotonic()
        body = stats(asked)
        assert time.monotonic() - started < 3  # ORGCAST_CLUSTER_TIMEOUT is 1 s
        assert body["partial"] is True, body
        assert victim not in [w["pid"] for w in body["workers"]]
        assert body["sockets"] == 3
    finally:
        os.kill(victim, signal.SIGCONT)
    wait_stats(asked, lambda b: not b["partial"] and b["sockets"] == 4)
