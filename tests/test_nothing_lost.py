"""Nothing lost, nothing twice (issue 16): every event answered 202 reaches the sockets of its
room once and in order, through faults made with real processes — a worker killed with SIGKILL,
one worker's bus connection cut while another publishes, Redis restarted with and without its
data — and a pid that is not the client's own recovers nothing."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from cluster import running
from conftest import API_KEY, JsClient, Server, base_env, event_data, fresh_database, publish, start_gunicorn
from test_lifecycle import new_user
from throwaway import ThrowawayPostgres, ThrowawayRedis

pytestmark = pytest.mark.slow

BOB = {"token": "tok-bob", "organizationId": "org-a"}
RECONNECT = {"reconnection": True, "reconnectionDelay": 300, "reconnectionDelayMax": 300,
             "randomizationFactor": 0, "transports": ["websocket"]}


@pytest.fixture
def own_postgres() -> Iterator[ThrowawayPostgres]:
    with fresh_database() as pg:
        yield pg


class Publisher:
    """Publish numbered events to org-a in a thread; remember which were answered 202."""

    def __init__(self, server: Server, label: str, rate: float = 50.0) -> None:
        self._server = server
        self.label = label
        self._rate = rate
        self.accepted: list[int] = []
        self.attempted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._session = requests.Session()

    def __enter__(self) -> Publisher:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._session.close()

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            self.attempted = n + 1
            try:
                reply = self._session.post(f"{self._server.url}/api/v1/organizations/org-a/events",
                                           json={"event": "news", "data": {"label": self.label, "n": n}},
                                           headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5)
                if reply.status_code == 202:
                    self.accepted.append(n)
            except requests.RequestException:
                self._session.close()
                self._session = requests.Session()
            n += 1
            self._stop.wait(1 / self._rate)


def received(client: JsClient, label: str, until: str, timeout: float = 20.0,
             got: list[int] | None = None) -> list[int]:
    """The numbers of the ``label`` events the client gets before ``until`` (an event's name, or a
    line's type such as "connect", whose line is then the last item)."""
    got = [] if got is None else got
    while True:
        line = client.next("event", "connect", "disconnect", timeout=timeout)
        if line["type"] == until:
            got.append(line)  # type: ignore[arg-type]
            return got
        if line["type"] != "event":
            continue
        if line["name"] == until:
            return got
        data = event_data(line)[0]
        if isinstance(data, dict) and data.get("label") == label:
            got.append(data["n"])


def check_once_in_order(got: list[int], publisher: Publisher) -> None:
    assert len(got) == len(set(got)), f"delivered twice: {sorted(n for n in set(got) if got.count(n) > 1)}"
    assert got == sorted(got), "out of order"
    missing = sorted(set(publisher.accepted) - set(got))
    assert not missing, f"answered 202 and never delivered: {missing}"
    assert set(got) <= set(range(publisher.attempted))


def worker_holding(server: Server, sid: str, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    pattern = re.compile(rf"\[(\d+)\] \[DEBUG\] app\.realtime\.namespace: admitted socket {re.escape(sid)}")
    while not (found := pattern.findall(server.output())):
        assert time.monotonic() < deadline, "no admitted line"
        time.sleep(0.02)
    return int(found[-1])


def bus_env(kind: str, postgres: ThrowawayPostgres, redis_server: Any) -> dict[str, str]:
    env = base_env(postgres, ORGCAST_LOG_LEVEL="debug", WEB_CONCURRENCY="2")
    if kind == "redis":
        env["REDIS_URL"] = redis_server.url
    return env


@pytest.mark.parametrize(("kind", "workers"), [("postgres", 2), ("redis", 2), ("postgres", 4)])
def test_a_worker_killed_with_sigkill_loses_nothing(kind: str, workers: int, own_postgres: ThrowawayPostgres,
                                                    redis_server: Any, tmp_path: Path, js_client: Any) -> None:
    server = start_gunicorn({**bus_env(kind, own_postgres, redis_server), "WEB_CONCURRENCY": str(workers)},
                            tmp_path)
    try:
        client = js_client(server.url, auth=BOB, **RECONNECT)
        first = client.next("connect")
        victim = worker_holding(server, first["id"])
        with Publisher(server, "kill") as publisher:
            time.sleep(0.5)
            os.kill(victim, signal.SIGKILL)
            got = received(client, "kill", until="connect", timeout=15)
            back: Any = got.pop()
            assert back["recovered"] is True, "the session of a killed worker was not recovered"
            time.sleep(0.5)
        assert publish(server, "org-a", "marker", "after").status_code == 202
        check_once_in_order(received(client, "kill", until="marker", got=got), publisher)
        assert len(publisher.accepted) > 20
    finally:
        server.stop()


def test_the_bus_connection_of_one_worker_cut_while_another_publishes(own_postgres: ThrowawayPostgres,
                                                                      tmp_path: Path, listen: Any) -> None:
    """Postgres: one worker's LISTEN connection is terminated; what is published meanwhile
    through the other reaches its sockets once it is back, once each, in order."""
    env = base_env(own_postgres, ORGCAST_LOG_LEVEL="debug")
    with running(env, tmp_path, [2]) as cluster:
        placed = cluster.spread(listen, BOB)
        victim = own_postgres.psql("SELECT pid FROM pg_stat_activity WHERE application_name = 'orgcast-listen' "
                                   "ORDER BY pid LIMIT 1").strip()
        own_postgres.psql(f"SELECT pg_terminate_backend({victim})")
        values = []
        for n in range(30):
            assert publish(cluster.servers[0], "org-a", "news", {"cut": n}).status_code == 202
            values.append({"cut": n})
        assert publish(cluster.servers[0], "org-a", "marker", "m").status_code == 202
        for listener, _, _ in placed:
            got = [data for name, data in listener.events_before("marker", "m", timeout=20) if name == "news"]
            assert got == values


def test_the_log_reader_of_one_worker_cut_on_redis(own_postgres: ThrowawayPostgres, redis_server: Any,
                                                  tmp_path: Path, listen: Any) -> None:
    env = base_env(own_postgres, ORGCAST_LOG_LEVEL="debug", REDIS_URL=redis_server.url)
    with running(env, tmp_path, [2]) as cluster:
        placed = cluster.spread(listen, BOB)
        client = redis.Redis.from_url(redis_server.url)
        readers = [c for c in client.client_list() if "xread" in c.get("cmd", "")]
        assert readers, client.client_list()
        client.client_kill_filter(_id=readers[0]["id"])
        values = [{"cut": n} for n in range(30)]
        for value in values:
            assert publish(cluster.servers[0], "org-a", "news", value).status_code == 202
        assert publish(cluster.servers[0], "org-a", "marker", "m").status_code == 202
        for listener, _, _ in placed:
            got = [data for name, data in listener.events_before("marker", "m", timeout=20) if name == "news"]
            assert got == values


@pytest.mark.parametrize("persistent", [True, False], ids=["with-its-data", "without-its-data"])
def test_redis_restarted(persistent: bool, own_postgres: ThrowawayPostgres, tmp_path: Path,
                         js_client: Any) -> None:
    """With its data (an append-only file), nothing is lost and sockets stay recovered; without
    it the log's epoch changes, and every socket is told (it reconnects, not recovered)."""
    first_redis = ThrowawayRedis(persistent=persistent).start()
    second = None
    server = start_gunicorn(base_env(own_postgres, REDIS_URL=first_redis.url, WEB_CONCURRENCY="2"), tmp_path)
    try:
        client = js_client(server.url, auth=BOB, **RECONNECT)
        assert client.next("connect")["recovered"] is False
        assert publish(server, "org-a", "news", "before").status_code == 202
        assert event_data(client.next("event"))[0] == "before"
        first_redis.stop(keep=True)
        second = ThrowawayRedis(port=first_redis.port, persistent=persistent, root=first_redis.root).start()
        deadline = time.monotonic() + 20
        while publish(server, "org-a", "news", "after").status_code != 202:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        if persistent:
            # The same log: the socket may have reconnected meanwhile, and then it was recovered.
            while True:
                line = client.next("event", "connect", timeout=20)
                if line["type"] == "connect":
                    assert line["recovered"] is True
                    continue
                if event_data(line)[0] == "after":
                    break
        else:
            line = client.next("connect", timeout=20)
            assert line["recovered"] is False, "a socket was not told that Redis lost what it held"
    finally:
        server.stop()
        if second is not None:
            second.stop()
        first_redis.stop()


@pytest.fixture(scope="module")
def instance(postgres: Any, tmp_path_factory: Any) -> Iterator[Server]:
    server = start_gunicorn(base_env(postgres, ORGCAST_LOG_LEVEL="debug"), tmp_path_factory.mktemp("pids"))
    yield server
    server.stop()


def connect_raw(server: Server, auth: dict[str, Any]) -> str:
    from protocol import RawSession

    raw = RawSession.connect(server.port)
    try:
        return raw.connect_socketio(auth)
    finally:
        raw.close()


def pid_of(answer: str) -> str:
    import json

    assert answer.startswith("40{"), answer
    return str(json.loads(answer[2:])["pid"])


def test_a_tampered_pid_or_another_user_s_is_a_new_session(instance: Server) -> None:
    pid = pid_of(connect_raw(instance, BOB))
    head, sid, nonce, mac = pid.split(".")
    tampered = [f"{int(head) - 1}.{sid}.{nonce}.{mac}", f"{head}.{sid}x.{nonce}.{mac}",
                f"{head}.{sid}.{nonce}.{mac[:-1]}{'A' if mac[-1] != 'A' else 'B'}", f"{head}.{sid}.x{nonce}.{mac}",
                "garbage", pid + "."]
    for bad in tampered:
        again = pid_of(connect_raw(instance, {**BOB, "pid": bad, "offset": head}))
        assert again != bad
    # The same pid, presented by another user (alice, same organization): not hers.
    alice = pid_of(connect_raw(instance, {"token": "tok-alice", "organizationId": "org-a", "pid": pid,
                                          "offset": head}))
    assert alice != pid
    # Bob's own pid is his: recovered (the same pid back).
    assert pid_of(connect_raw(instance, {**BOB, "pid": pid, "offset": head})) == pid


def test_an_offset_beyond_the_log_is_not_recovered(instance: Server) -> None:
    pid = pid_of(connect_raw(instance, BOB))
    head = pid.split(".")[0]
    assert pid_of(connect_raw(instance, {**BOB, "pid": pid, "offset": str(int(head) + 10**9)})) != pid
    assert pid_of(connect_raw(instance, {**BOB, "pid": pid, "offset": "not-a-number"})) != pid


def test_a_subscription_comes_back_after_a_kill_and_one_lost_meanwhile_does_not(
        own_postgres: ThrowawayPostgres, tmp_path: Path, js_client: Any) -> None:
    server = start_gunicorn(base_env(own_postgres, ORGCAST_LOG_LEVEL="debug", WEB_CONCURRENCY="2"), tmp_path)
    try:
        user, token = new_user(own_postgres, 3600, ("org-a", "org-b", "org-c"))
        client = js_client(server.url, auth={"token": token, "organizationId": "org-a"}, **RECONNECT)
        first = client.next("connect")
        for org in ("org-b", "org-c"):
            client.command(f'emit ["subscribe", {{"organizationId": "{org}"}}]')
            assert client.next("ack")["args"][0]["ok"] is True
        own_postgres.psql(f"DELETE FROM organization_users WHERE organization_id = 'org-c' AND user_id = '{user}'")
        os.kill(worker_holding(server, first["id"]), signal.SIGKILL)
        assert client.next("connect", timeout=15)["recovered"] is True
        for org in ("org-a", "org-b", "org-c"):
            assert publish(server, org, "news", org).status_code == 202
        assert publish(server, "org-a", "marker", "m").status_code == 202
        got = []
        while (line := client.next("event", timeout=10))["name"] != "marker":
            got.append(event_data(line)[0])
        assert got == ["org-a", "org-b"]
    finally:
        server.stop()


def test_a_member_removed_while_away_is_refused_despite_the_auth_cache(own_postgres: ThrowawayPostgres,
                                                                       tmp_path: Path, js_client: Any) -> None:
    """A recovering connect asks the database, not the cache: the cached "yes" of a minute
    ago does not give the session back to a user who was removed meanwhile."""
    server = start_gunicorn(base_env(own_postgres, ORGCAST_AUTH_CACHE_TTL="60"), tmp_path)
    try:
        user, token = new_user(own_postgres, 3600, ("org-a",))
        slow = {**RECONNECT, "reconnectionDelay": 1000, "reconnectionDelayMax": 1000}
        client = js_client(server.url, auth={"token": token, "organizationId": "org-a"}, **slow)
        client.next("connect")
        client.command("drop")
        client.next("disconnect")
        own_postgres.psql(f"DELETE FROM organization_users WHERE user_id = '{user}'")
        refused = client.next("connect_error", "connect", timeout=10)
        assert refused["type"] == "connect_error" and refused["data"] == {"code": "forbidden"}
    finally:
        server.stop()


@pytest.mark.parametrize("bus", ["postgres", "redis"])
def test_two_hundred_rapid_publishes_reach_five_sockets_once_in_order(bus: str, postgres: Any, redis_server: Any,
                                                                       tmp_path: Path, listen: Any) -> None:
    env = base_env(postgres, ORGCAST_LOG_LEVEL="debug")
    if bus == "redis":
        env["REDIS_URL"] = redis_server.url
    with running(env, tmp_path, [2]) as cluster:
        sockets = [listener for listener, _, _ in cluster.spread(listen, BOB, per_worker=1)]
        sockets += [listen(cluster.servers[0].url, auth=BOB) for _ in range(5 - len(sockets))]
        session = requests.Session()
        label = f"rapid-{bus}-{time.monotonic()}"
        for n in range(200):
            reply = session.post(f"{cluster.servers[0].url}/api/v1/organizations/org-a/events",
                                 json={"event": "news", "data": {"label": label, "n": n}},
                                 headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)
            assert reply.status_code == 202
        session.close()
        assert publish(cluster.servers[0], "org-a", "marker", label).status_code == 202
        for listener in sockets:
            got = [data["n"] for name, data in listener.events_before("marker", label, timeout=20)
                   if name == "news" and isinstance(data, dict) and data.get("label") == label]
            assert got == list(range(200))
