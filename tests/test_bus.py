"""Every path delivers to every worker and host, exactly once: two gunicorn
instances (4 and 2 workers) sharing the database — and Redis, for the Redis
bus — with sockets on every worker, and events published over HTTP, with
``pg_notify``, with the real Node emitters and with PHP-shaped frames."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import requests
from cluster import Cluster, running
from conftest import API_KEY, ROOT, Listener, base_env, publish, unique
from php_emitter import ashiina_frames, rase_frame

pytestmark = pytest.mark.slow

NODE_MODULES = ROOT / ".cache" / "npm" / "node_modules"
EMIT_JS = ROOT / "tests" / "js" / "emit.js"
BOB = {"token": "tok-bob", "organizationId": "org-a"}
ALICE = {"token": "tok-alice", "organizationId": "org-a"}
CAROL = {"token": "tok-carol", "organizationId": "org-b"}
ATTACHMENTS = """CREATE TABLE IF NOT EXISTS socket_io_attachments (
    id bigserial UNIQUE, created_at timestamptz DEFAULT NOW(), payload bytea)"""


@pytest.fixture(scope="module", params=["postgres", "redis"])
def cluster(request: pytest.FixtureRequest, postgres: Any, redis_server: Any,
            tmp_path_factory: Any) -> Iterator[Cluster]:
    env = base_env(postgres, ORGCAST_LOG_LEVEL="debug", ORGCAST_AUTH_CACHE_TTL="300")
    if request.param == "redis":
        env["REDIS_URL"] = redis_server.url
    postgres.psql(ATTACHMENTS)
    with running(env, tmp_path_factory.mktemp(f"cluster-{request.param}"), [4, 2]) as found:
        found.kind = request.param  # type: ignore[attr-defined]
        yield found


#: tests of the Redis emitters run on the Redis cluster only (they need REDIS_URL)
redis_only = pytest.mark.parametrize("cluster", ["redis"], indirect=True)


def node_emit(kind: str, url: str, ops: list[dict[str, Any]]) -> None:
    node = shutil.which("node")
    assert node, "node is required"
    out = subprocess.run([node, str(EMIT_JS), kind, url, json.dumps(ops)], capture_output=True, text=True,
                         timeout=30, env={"PATH": "/usr/bin:/bin", "NODE_PATH": str(NODE_MODULES)})
    assert out.returncode == 0, out.stdout + out.stderr


def received(listeners: list[Listener], marker: str) -> list[list[tuple[str, Any]]]:
    """What each socket received before ``marker`` (published last, by the same path)."""
    return [listener.events_before("marker", marker, timeout=10) for listener in listeners]


def socks(placed: list[tuple[Listener, Any, int]]) -> list[Listener]:
    return [listener for listener, _, _ in placed]


@pytest.fixture
def org_a(cluster: Cluster, listen: Any) -> list[Listener]:
    """A socket of bob (organization org-a) on every worker of every instance."""
    return socks(cluster.spread(listen, BOB))


@pytest.fixture
def org_b(cluster: Cluster, listen: Any) -> list[Listener]:
    """A socket of carol (organization org-b) on every worker."""
    return socks(cluster.spread(listen, CAROL))


# --- the HTTP API --------------------------------------------------------------------------


def test_http_publishes_reach_every_worker_of_every_instance_exactly_once(
        cluster: Cluster, org_a: list[Listener], org_b: list[Listener]) -> None:
    values = []
    for server in cluster.servers * 3:  # whichever worker each request lands on
        values.append(unique("http"))
        assert publish(server, "org-a", "news", values[-1]).status_code == 202
    marker = unique("marker")
    for organization in ("org-a", "org-b"):
        assert publish(cluster.servers[1], organization, "marker", marker).status_code == 202
    assert received(org_a, marker) == [[("news", v) for v in values]] * len(org_a)
    assert received(org_b, marker) == [[]] * len(org_b)


def test_a_100_kb_event_arrives_everywhere(cluster: Cluster, org_a: list[Listener]) -> None:
    big = {"blob": "x" * 100_000, "id": unique("big")}
    assert publish(cluster.servers[0], "org-a", "news", big).status_code == 202
    marker = unique("marker")
    assert publish(cluster.servers[1], "org-a", "marker", marker).status_code == 202
    assert received(org_a, marker) == [[("news", big)]] * len(org_a)


def test_disconnect_user_kicks_on_every_worker_and_forgets_the_cache_everywhere(
        cluster: Cluster, listen: Any, postgres: Any) -> None:
    user = unique("kicked").replace("-", "")
    token = f"tok-{user}"
    postgres.psql(f"INSERT INTO oauth_access_tokens VALUES ('{token}', 'c', '{user}', NOW() + interval '1 hour', '');"
                  f"INSERT INTO organization_users VALUES ('org-a', '{user}')")
    kicked = socks(cluster.spread(listen, {"token": token, "organizationId": "org-a"}))
    bystanders = socks(cluster.spread(listen, BOB))
    # Every worker has accepted (and cached) this token; the application revokes it...
    postgres.psql(f"DELETE FROM oauth_access_tokens WHERE access_token = '{token}'")
    reply = requests.post(f"{cluster.servers[0].url}/api/v1/users/{user}/disconnect",
                          headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5)
    assert reply.status_code == 202
    for listener in kicked:
        listener.wait_for("disconnect", timeout=10)
    # ... and no worker accepts it from its cache any more.
    refused_on: set[tuple[int, int]] = set()
    all_workers = {(i, pid) for i, s in enumerate(cluster.servers) for pid in cluster.worker_pids(s)}
    for attempt in range(300):
        server_index = attempt % len(cluster.servers)
        server = cluster.servers[server_index]
        since = len(server.output())
        attempt_listener = listen(server.url, auth={"token": token, "organizationId": "org-a"})
        assert attempt_listener.refusal_code == "token_invalid"
        line = re.search(r"\[(\d+)\] \[INFO\] app\.realtime\.namespace: connect refused", server.output()[since:])
        if line:
            refused_on.add((server_index, int(line.group(1))))
        if refused_on >= all_workers:
            break
    assert refused_on >= all_workers
    marker = unique("marker")
    assert publish(cluster.servers[1], "org-a", "marker", marker).status_code == 202
    assert all(listener.client.connected for listener in bystanders)
    assert received(bystanders, marker) == [[]] * len(bystanders)


# --- pg_notify and the Postgres emitter ----------------------------------------------------------


def notify(postgres: Any, body: dict[str, Any], rollback: bool = False) -> None:
    payload = json.dumps(body).replace("'", "''")
    end = "ROLLBACK" if rollback else "COMMIT"
    postgres.psql(f"BEGIN; SELECT pg_notify('orgcast', '{payload}'); {end};")


def test_pg_notify_is_delivered_on_commit_everywhere_and_never_on_rollback(
        cluster: Cluster, postgres: Any, org_a: list[Listener], org_b: list[Listener]) -> None:
    committed, rolled_back = unique("commit"), unique("rollback")
    notify(postgres, {"room": "organization.org-a", "event": "news", "data": {"v": committed}})
    notify(postgres, {"room": "organization.org-a", "event": "news", "data": {"v": rolled_back}},
           rollback=True)
    notify(postgres, {"room": "organization.org-a", "event": "news"})  # no data: null
    marker = unique("marker")
    for organization in ("org-a", "org-b"):
        notify(postgres, {"room": f"organization.{organization}", "event": "marker", "data": marker})
    assert received(org_a, marker) == [[("news", {"v": committed}), ("news", None)]] * len(org_a)
    assert received(org_b, marker) == [[]] * len(org_b)


def test_malformed_notifications_are_dropped_and_the_listener_lives(
        cluster: Cluster, postgres: Any, org_a: list[Listener]) -> None:
    for garbage in ("not json", "[1,2]", '{"room": "organization.org-a"}',
                    '{"room": "elsewhere", "event": "news"}', '{"room": "organization.org-a", "event": "connect"}',
                    "[" * 5000):
        postgres.psql(f"SELECT pg_notify('orgcast', '{garbage}')")
    marker = unique("marker")
    notify(postgres, {"room": "organization.org-a", "event": "marker", "data": marker})
    assert received(org_a, marker) == [[]] * len(org_a)
    logs = "".join(server.output() for server in cluster.servers)
    assert "dropped a message on orgcast" in logs and "Traceback" not in logs


def test_node_postgres_emitter_reaches_every_worker_exactly_once(
        cluster: Cluster, postgres: Any, org_a: list[Listener], org_b: list[Listener]) -> None:
    small, big = unique("pg-emitter"), {"blob": "y" * 20_000, "id": unique("attachment")}
    marker = unique("marker")
    node_emit("postgres", postgres.dsn, [
        {"to": ["organization.org-a"], "args": ["news", small, 2]},
        {"to": ["organization.org-a"], "args": ["news", big]},                 # over 8,000 bytes
        {"to": ["organization.org-a", "user.bob"], "args": ["news", "once"]},  # bob is in both
        {"of": "/admin", "to": ["organization.org-a"], "args": ["news", "other namespace"]},
        {"to": ["organization.org-a"], "args": ["marker", marker]},
        {"to": ["organization.org-b"], "args": ["marker", marker]},
    ])
    want = [("news", small), ("news", big), ("news", "once")]
    got = received(org_a, marker)
    assert [[(e, d) for e, d in events] for events in got] == [want] * len(org_a)
    assert received(org_b, marker) == [[]] * len(org_b)


def test_node_postgres_emitter_without_nsp_and_disconnect_sockets(
        cluster: Cluster, postgres: Any, listen: Any) -> None:
    alice = socks(cluster.spread(listen, ALICE))
    bob = socks(cluster.spread(listen, BOB))
    doc = {"uid": "emitter", "type": 3, "data": {
        "packet": {"type": 2, "data": ["news", "no nsp"]}, "opts": {"rooms": ["user.alice"], "except": []}}}
    postgres.psql(f"SELECT pg_notify('socket.io#/', '{json.dumps(doc)}')")
    for listener in alice:
        assert listener.wait_for("news", timeout=10) == "no nsp"
    node_emit("postgres", postgres.dsn, [{"disconnect": ["user.alice"]}])
    for listener in alice:
        listener.wait_for("disconnect", timeout=10)
    marker = unique("marker")
    assert publish(cluster.servers[0], "org-a", "marker", marker).status_code == 202
    assert received(bob, marker) == [[]] * len(bob)


# --- the Redis emitters -------------------------------------------------------------------------


@redis_only
def test_node_redis_emitter_reaches_every_worker_exactly_once(
        cluster: Cluster, redis_server: Any, org_a: list[Listener], org_b: list[Listener],
        listen: Any) -> None:
    alice = socks(cluster.spread(listen, ALICE))
    marker = unique("marker")
    node_emit("redis", redis_server.url, [
        {"to": ["organization.org-a"], "args": ["news", "one room", {"n": 1}]},
        {"to": ["organization.org-a", "user.alice"], "args": ["news", "two rooms"]},
        {"to": ["organization.org-a"], "except": ["user.alice"], "args": ["news", "not alice"]},
        {"to": ["organization.org-a"], "args": ["marker", marker]},
        {"to": ["organization.org-b"], "args": ["marker", marker]},
    ])
    assert received(org_a, marker) == [[("news", "one room"), ("news", "two rooms"),
                                        ("news", "not alice")]] * len(org_a)
    assert received(alice, marker) == [[("news", "one room"), ("news", "two rooms")]] * len(alice)
    assert received(org_b, marker) == [[]] * len(org_b)


@redis_only
def test_php_emitters_of_both_generations(cluster: Cluster, redis_server: Any,
                                          org_a: list[Listener], listen: Any) -> None:
    alice = socks(cluster.spread(listen, ALICE))
    client = redis.Redis.from_url(redis_server.url)
    marker = unique("marker")
    frames = [
        *ashiina_frames("socket.io", ["organization.org-a"], ["news", {"from": "ashiina"}]),
        # once per room, the full list each time: each socket gets it once
        *ashiina_frames("socket.io", ["organization.org-a", "user.alice", "user.bob"], ["news", "multi"]),
        # an integer room (no orgcast room) beside a real one; flags as a PHP map
        *ashiina_frames("socket.io", [42, "user.alice"], ["news", "int room"], {"broadcast": True}),
        rase_frame("socket.io", ["organization.org-a"], ["news", {"from": "rase"}]),
        *ashiina_frames("socket.io", [], ["news", "everyone"]),  # no room: off by default
        *ashiina_frames("socket.io", ["organization.org-a"], ["marker", marker]),
    ]
    for channel, message in frames:
        client.publish(channel, message)
    client.close()
    expected_bob = [("news", {"from": "ashiina"}), ("news", "multi"), ("news", {"from": "rase"})]
    assert received(org_a, marker) == [expected_bob] * len(org_a)
    assert received(alice, marker) == [[("news", {"from": "ashiina"}), ("news", "multi"),
                                        ("news", "int room"), ("news", {"from": "rase"})]] * len(alice)


@redis_only
def test_redis_garbage_is_dropped_and_the_listener_lives(
        cluster: Cluster, redis_server: Any, org_a: list[Listener]) -> None:
    client = redis.Redis.from_url(redis_server.url)
    (channel, good), = ashiina_frames("socket.io", ["organization.org-a"], ["news", "x"])
    (_, reserved), = ashiina_frames("socket.io", ["organization.org-a"], ["connect", "forged"])
    (_, other_ns), = ashiina_frames("socket.io", ["organization.org-a"], ["news", "admin"], {"nsp": "/admin"})
    for target, message in [(channel, b"\xc1\xff garbage"), (channel, b""), (channel, good[:-3]),
                            (channel, reserved), ("socket.io#/admin#organization.org-a#", other_ns),
                            ("socket.io#/#", b"\x93\xa7emitter\x92\x01\x02\x90"),
                            ("socket.io-request#/#", b"not json")]:
        client.publish(target, message)
    marker = unique("marker")
    (_, mark), = ashiina_frames("socket.io", ["organization.org-a"], ["marker", marker])
    client.publish(channel, mark)
    client.close()
    assert received(org_a, marker) == [[]] * len(org_a)
    logs = "".join(server.output() for server in cluster.servers)
    assert "redis-emitter: dropped a message" in logs and "Traceback" not in logs


@redis_only
def test_redis_disconnect_sockets_kicks_and_sockets_join_is_refused(
        cluster: Cluster, redis_server: Any, listen: Any) -> None:
    alice = socks(cluster.spread(listen, ALICE))
    bob = socks(cluster.spread(listen, BOB))
    carol = socks(cluster.spread(listen, CAROL))
    marker = unique("marker")
    node_emit("redis", redis_server.url, [
        {"to": ["user.carol"], "socketsJoin": ["organization.org-a"]},
        {"disconnect": ["user.alice"]},
        {"to": ["organization.org-a"], "args": ["news", "after"]},
        {"to": ["organization.org-a"], "args": ["marker", marker]},
        {"to": ["organization.org-b"], "args": ["marker", marker]},
    ])
    for listener in alice:
        listener.wait_for("disconnect", timeout=10)
    assert received(bob, marker) == [[("news", "after")]] * len(bob)
    assert received(carol, marker) == [[]] * len(carol)  # never joined organization.org-a
    logs = "".join(server.output() for server in cluster.servers)
    assert "socketsJoin/socketsLeave refused" in logs


def test_one_leader_hears_the_sources(cluster: Cluster) -> None:
    logs = "".join(server.output() for server in cluster.servers)
    leaders = re.findall(r"\[(\d+)\] \[INFO\] app\.bus\.(\w+): this worker is the leader", logs)
    backends = sorted(backend for _, backend in leaders)
    # one process of the whole deployment hears SQL, and one the Redis emitters
    assert backends == (["postgres", "redis"] if cluster.kind == "redis" else ["postgres"])  # type: ignore[attr-defined]
