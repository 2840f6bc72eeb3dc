"""Losing the bus never kills the service: connected sockets stay, new connects
go on, publishes answer 503 while the log cannot take them, the listeners
reconnect by themselves, and every event answered 202 reaches every socket
once. Each test owns its Postgres or Redis."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from cluster import Cluster
from conftest import Listener, base_env, fresh_database, publish, start_gunicorn, unique
from throwaway import ThrowawayPostgres, ThrowawayRedis

pytestmark = pytest.mark.slow

BOB = {"token": "tok-bob", "organizationId": "org-a"}


@pytest.fixture
def own_postgres() -> Iterator[ThrowawayPostgres]:
    with fresh_database() as pg:
        yield pg


@pytest.fixture
def own_redis() -> Iterator[ThrowawayRedis]:
    server = ThrowawayRedis().start()
    yield server
    server.stop()


def until(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"not {what} within {timeout} s"
        time.sleep(0.05)


def readyz(url: str) -> tuple[int, dict[str, Any]]:
    with requests.get(url + "/readyz", timeout=5) as reply:
        return reply.status_code, reply.json()


def delivered_after_recovery(cluster: Cluster, sockets: list[Listener], timeout: float = 15) -> float:
    """Publish until the bus takes events again; return the seconds it took.

    Every event it took (202) then reaches every socket once, in order:
    a worker whose listener was away reads the log from its cursor.
    """
    started = time.monotonic()
    accepted: list[str] = []
    while len(accepted) < 5:
        assert time.monotonic() - started < timeout, f"the bus did not take events again within {timeout} s"
        value = unique("recovered")
        if publish(cluster.servers[0], "org-a", "news", value).status_code == 202:
            accepted.append(value)
        else:
            time.sleep(0.1)
    took = time.monotonic() - started
    marker = unique("marker")
    assert publish(cluster.servers[0], "org-a", "marker", marker).status_code == 202
    for listener in sockets:
        got = [data for name, data in listener.events_before("marker", marker, timeout=timeout)
               if name == "news" and str(data).startswith("recovered-")]
        assert got == accepted
    return took


def start_cluster(env: dict[str, str], tmp_path: Any) -> Cluster:
    server = start_gunicorn({**env, "WEB_CONCURRENCY": "2", "ORGCAST_LOG_LEVEL": "debug"}, tmp_path)
    cluster = Cluster([server], [2])
    cluster.wait_listening()
    return cluster


def test_postgres_listen_connections_terminated_reconnect(own_postgres: ThrowawayPostgres, listen: Any,
                                                          tmp_path: Any) -> None:
    cluster = start_cluster(base_env(own_postgres), tmp_path)
    try:
        sockets = [listener for listener, _, _ in cluster.spread(listen, BOB)]
        killed = own_postgres.psql("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                   "WHERE application_name = 'orgcast-listen'").strip()
        assert int(killed) >= 2
        assert delivered_after_recovery(cluster, sockets) < 10
        assert all(listener.client.connected for listener in sockets)
        assert "bus connection lost" in cluster.servers[0].output()
    finally:
        cluster.servers[0].stop()


def test_postgres_stopped_publish_is_503_then_recovers(own_postgres: ThrowawayPostgres, listen: Any,
                                                       tmp_path: Any) -> None:
    cluster = start_cluster(base_env(own_postgres), tmp_path)
    server = cluster.servers[0]
    try:
        sockets = [listener for listener, _, _ in cluster.spread(listen, BOB)]
        own_postgres.stop_server()
        reply = until(lambda: (r := publish(server, "org-a", "news", "lost")).status_code == 503 and [r], 10,
                      "a 503")[0]
        assert reply.json()["error"]["code"] == "unavailable" and reply.headers["Retry-After"]
        status, body = until(lambda: (r := readyz(server.url))[0] == 503 and not r[1]["checks"]["bus"]["ok"]
                             and r, 10, "/readyz naming the bus")
        assert body["checks"]["bus"]["ok"] is False
        assert all(listener.client.connected for listener in sockets)  # nobody was dropped
        own_postgres.restart()
        assert delivered_after_recovery(cluster, sockets) < 15
        until(lambda: readyz(server.url)[0] == 200, 10, "ready again")
        assert server.alive()
    finally:
        server.stop()


def test_redis_killed_publish_is_503_connects_go_on_then_recovers(
        own_postgres: ThrowawayPostgres, own_redis: ThrowawayRedis, listen: Any, tmp_path: Any) -> None:
    cluster = start_cluster(base_env(own_postgres, REDIS_URL=own_redis.url), tmp_path)
    server = cluster.servers[0]
    replacement = None
    try:
        sockets = [listener for listener, _, _ in cluster.spread(listen, BOB)]
        own_redis.stop()
        reply = until(lambda: (r := publish(server, "org-a", "news", "lost")).status_code == 503 and [r], 10,
                      "a 503")[0]
        assert reply.json()["error"]["code"] == "unavailable" and reply.headers["Retry-After"]
        status, body = until(lambda: (r := readyz(server.url))[0] == 503 and r, 10, "/readyz 503")
        assert body["checks"]["bus"]["ok"] is False and body["checks"]["redis"]["ok"] is False
        # New connects go on: authorization needs only Postgres.
        late = listen(server.url, auth=BOB)
        assert late.connect_error is None and all(listener.client.connected for listener in sockets)
        replacement = ThrowawayRedis(port=own_redis.port).start()
        # An empty Redis: the log lost what it held, so every socket is told (it is
        # disconnected; a client with recovery reconnects and learns recovered: false).
        for listener in [*sockets, late]:
            listener.wait_for("disconnect", timeout=20)
        until(lambda: readyz(server.url)[0] == 200, 10, "ready again")
        fresh = [listener for listener, _, _ in cluster.spread(listen, BOB)]
        assert delivered_after_recovery(cluster, fresh) < 15
    finally:
        server.stop()
        if replacement is not None:
            replacement.stop()
