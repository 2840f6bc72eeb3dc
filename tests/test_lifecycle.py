"""The session lifecycle against the real gunicorn: tokens that expire, refresh,
subscribe / unsubscribe, the per-user limit, and what protects the database
and the workers: rate limiting by client address, the cap on sessions an
address holds unadmitted, coalesced lookups in a reconnect storm."""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
import requests
from conftest import API_KEY, Listener, Server, base_env, fresh_database, publish, start_gunicorn, unique
from protocol import RawSession, raw_http, upgrade_request
from throwaway import ThrowawayPostgres

pytestmark = pytest.mark.slow

_serial = itertools.count()


def new_user(postgres: ThrowawayPostgres, expires_in: float, organizations: tuple[str, ...] = ("org-a",),
             user: str | None = None) -> tuple[str, str]:
    """Insert a token (and memberships); return (user, token)."""
    n = next(_serial)
    user = user or f"life{n}x{int(time.time() * 1000) % 100000}"
    token = f"tok-{user}-{n}"
    postgres.psql(f"INSERT INTO oauth_access_tokens VALUES ('{token}', 'c', '{user}', "
                  f"NOW() + interval '{expires_in} seconds', '')")
    for organization in organizations:
        postgres.psql(f"INSERT INTO organization_users VALUES ('{organization}', '{user}') ON CONFLICT DO NOTHING")
    return user, token


@pytest.fixture(scope="module")
def server(postgres: ThrowawayPostgres, tmp_path_factory: Any) -> Iterator[Server]:
    srv = start_gunicorn(base_env(postgres, ORGCAST_EXPIRY_WARNING="1", ORGCAST_MAX_SUBSCRIPTIONS="3"),
                         tmp_path_factory.mktemp("lifecycle"))
    yield srv
    srv.stop()


def call(listener: Listener, event: str, *args: Any) -> Any:
    return listener.client.call(event, *args, timeout=10)


def still_connected(server: Server, listener: Listener, organization: str = "org-a") -> bool:
    marker = unique("alive")
    assert publish(server, organization, "marker", marker).status_code == 202
    try:
        listener.events_before("marker", marker, timeout=3)
    except AssertionError:
        return False
    return listener.client.connected


# --- expiry ---------------------------------------------------------------------------------


def test_session_expiring_then_disconnect_when_the_token_expires(server: Server, postgres: Any,
                                                                 listen: Any) -> None:
    user, token = new_user(postgres, 3)
    started = time.time()
    listener = listen(server.url, auth={"token": token, "organizationId": "org-a"})
    assert listener.connect_error is None
    warning = listener.wait_for("session_expiring", timeout=5)
    warned_after = time.time() - started
    expires_at = datetime.fromisoformat(warning["expiresAt"].replace("Z", "+00:00")).timestamp()
    assert warning["expiresAt"].endswith("Z") and abs(expires_at - (started + 3)) < 1.5
    assert 1.0 < warned_after < 3.0  # one second (ORGCAST_EXPIRY_WARNING) before expires
    listener.wait_for("disconnect", timeout=4)
    assert abs(time.time() - expires_at) < 1.0  # within a second of expires


def test_a_refresh_with_a_newer_token_moves_the_deadline(server: Server, postgres: Any, listen: Any) -> None:
    user, old = new_user(postgres, 3)
    _, newer = new_user(postgres, 3600, user=user)
    listener = listen(server.url, auth={"token": old, "organizationId": "org-a"})
    listener.wait_for("session_expiring", timeout=5)
    ack = call(listener, "refresh", {"token": newer})
    assert ack["ok"] is True
    assert abs(datetime.fromisoformat(ack["expiresAt"].replace("Z", "+00:00")).timestamp()
               - (time.time() + 3600)) < 5
    time.sleep(3)  # past the old token's expires: the new deadline holds (a bounded wait, then a check)
    assert still_connected(server, listener)


@pytest.mark.parametrize(("payload", "code"), [
    ({"token": "no-such-token"}, "token_invalid"),
    ({"token": "tok-expired"}, "token_expired"),
    ({"token": "tok-bob"}, "token_mismatch"),
    ({}, "token_missing"),
    ({"token": 42}, "token_invalid"),
    ("not an object", "bad_request"),
])
def test_a_refused_refresh_keeps_the_old_deadline(server: Server, postgres: Any, listen: Any,
                                                  payload: Any, code: str) -> None:
    user, token = new_user(postgres, 3)
    started = time.time()
    listener = listen(server.url, auth={"token": token, "organizationId": "org-a"})
    ack = call(listener, "refresh", payload)
    assert ack["ok"] is False and ack["code"] == code and ack["message"]
    listener.wait_for("disconnect", timeout=5)
    assert abs(time.time() - (started + 3)) < 1.5


def test_sockets_on_every_worker_expire(postgres: Any, tmp_path: Any, listen: Any) -> None:
    from cluster import Cluster

    env = base_env(postgres, WEB_CONCURRENCY="2", ORGCAST_LOG_LEVEL="debug", ORGCAST_EXPIRY_WARNING="1")
    srv = start_gunicorn(env, tmp_path)
    try:
        cluster = Cluster([srv], [2])
        cluster.wait_listening()
        _, token = new_user(postgres, 4)
        sockets = [listener for listener, _, _ in cluster.spread(listen, {"token": token, "organizationId": "org-a"})]
        for listener in sockets:
            listener.wait_for("disconnect", timeout=8)
    finally:
        srv.stop()


# --- subscribe / unsubscribe ------------------------------------------------------------------------


def test_subscribe_and_unsubscribe_change_exactly_what_arrives(server: Server, listen: Any) -> None:
    dave = listen(server.url, auth={"token": "tok-dave", "organizationId": "org-a"})
    ack = call(dave, "subscribe", {"organizationId": "org-b"})
    assert ack == {"ok": True, "room": "organization.org-b"}
    for organization in ("org-a", "org-b"):
        assert publish(server, organization, "news", organization).status_code == 202
    marker = unique("m")
    assert publish(server, "org-b", "marker", marker).status_code == 202
    assert dave.events_before("marker", marker) == [("news", "org-a"), ("news", "org-b")]

    assert call(dave, "unsubscribe", {"organizationId": "org-b"}) == {"ok": True, "room": "organization.org-b"}
    assert publish(server, "org-b", "news", "gone").status_code == 202
    marker = unique("m")
    assert publish(server, "org-a", "marker", marker).status_code == 202
    assert dave.events_before("marker", marker) == []

    # Leaving the organization it connected with is allowed; its user room stays.
    assert call(dave, "unsubscribe", {"organizationId": "org-a"})["ok"] is True
    assert publish(server, "org-a", "news", "not for dave").status_code == 202
    marker = unique("m")
    assert requests.post(f"{server.url}/api/v1/users/dave/events", json={"event": "marker", "data": marker},
                         headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5).status_code == 202
    assert dave.events_before("marker", marker) == []


@pytest.mark.parametrize(("payload", "code"), [
    ({"organizationId": "org-b"}, "forbidden"),     # bob is not a member of org-b
    ({"organizationId": "bad id"}, "organization_invalid"),
    ({"organizationId": ["org-b"]}, "organization_invalid"),
    ({}, "organization_missing"),
    ("org-b", "bad_request"),
])
def test_subscribe_refusals(server: Server, listen: Any, payload: Any, code: str) -> None:
    bob = listen(server.url, auth={"token": "tok-bob", "organizationId": "org-a"})
    ack = call(bob, "subscribe", payload)
    assert ack["ok"] is False and ack["code"] == code and ack["message"]
    assert publish(server, "org-b", "news", "not for bob").status_code == 202
    marker = unique("m")
    assert publish(server, "org-a", "marker", marker).status_code == 202
    assert bob.events_before("marker", marker) == []


def test_a_socket_is_in_at_most_the_configured_number_of_organizations(server: Server, postgres: Any,
                                                                     listen: Any) -> None:
    user, token = new_user(postgres, 3600, ("org-a", "org-b", "org-c", "org-d"))
    listener = listen(server.url, auth={"token": token, "organizationId": "org-a"})
    assert call(listener, "subscribe", {"organizationId": "org-b"})["ok"] is True
    assert call(listener, "subscribe", {"organizationId": "org-b"})["ok"] is True  # already in: still ok
    assert call(listener, "subscribe", {"organizationId": "org-c"})["ok"] is True
    refused = call(listener, "subscribe", {"organizationId": "org-d"})
    assert refused["ok"] is False and refused["code"] == "too_many_subscriptions"
    assert call(listener, "unsubscribe", {"organizationId": "org-c"})["ok"] is True
    assert call(listener, "subscribe", {"organizationId": "org-d"})["ok"] is True


# --- per-user limit ---------------------------------------------------------------------------------


def test_the_sockets_per_user_limit(postgres: Any, gunicorn_factory: Any, listen: Any) -> None:
    srv = gunicorn_factory(base_env(postgres, ORGCAST_MAX_SOCKETS_PER_USER="2"))
    auth = {"token": "tok-alice", "organizationId": "org-a"}
    first, second = listen(srv.url, auth=auth), listen(srv.url, auth=auth)
    assert first.connect_error is None and second.connect_error is None
    assert listen(srv.url, auth=auth).refusal_code == "too_many_sockets"
    assert listen(srv.url, auth={"token": "tok-bob", "organizationId": "org-a"}).connect_error is None
    first.close()
    deadline = time.monotonic() + 5
    while (again := listen(srv.url, auth=auth)).refusal_code == "too_many_sockets":
        assert time.monotonic() < deadline, "the closed socket still counts"
    assert again.connect_error is None


# --- rate limiting by client address -----------------------------------------------------------------


@pytest.fixture
def logged_postgres() -> Iterator[ThrowawayPostgres]:
    """A Postgres of its own that logs every statement (to count the lookups)."""
    with fresh_database() as pg:
        pg.psql("ALTER SYSTEM SET log_statement = 'all'")
        pg.psql("SELECT pg_reload_conf()")
        yield pg


def lookups(pg: ThrowawayPostgres, token: str | None = None) -> int:
    """Token lookups Postgres has logged so far (for ``token``, if given)."""
    text = (pg.root / "server.log").read_text(errors="replace")
    found = [line for line in text.splitlines() if "statement:" in line and "orgcast_token" in line]
    if token is None:
        return len(found)
    # The token travels as a literal parameter in the logged statement.
    return sum(1 for line in found if f"'{token}'" in line)


def connect_raw(port: int, token: str, source: str | None = None, forwarded: str | None = None) -> str:
    headers = [f"X-Forwarded-For: {forwarded}"] if forwarded else []
    raw = RawSession.connect(port, source=source, header=headers)
    try:
        answer = raw.connect_socketio({"token": token, "organizationId": "org-a"})
    finally:
        raw.close()
    if answer.startswith("40{"):
        return "ok"
    return str(json.loads(answer[2:])["data"]["code"])


def test_failed_authorizations_limit_an_address_without_asking_the_database(
        logged_postgres: ThrowawayPostgres, gunicorn_factory: Any) -> None:
    srv = gunicorn_factory(base_env(logged_postgres, ORGCAST_AUTH_FAILURES="5",
                                    ORGCAST_AUTH_FAILURE_WINDOW="60"))
    for i in range(5):
        assert connect_raw(srv.port, f"guess-{i}") == "token_invalid"
    before = lookups(logged_postgres)
    # Now even a good token from this address is refused, with no query.
    assert connect_raw(srv.port, "tok-alice") == "rate_limited"
    for i in range(20):
        assert connect_raw(srv.port, f"more-{i}") == "rate_limited"
    assert lookups(logged_postgres) == before
    # Another address is not affected.
    assert connect_raw(srv.port, "tok-alice", source="127.0.0.2") == "ok"


def test_a_spoofed_forwarded_header_from_an_untrusted_peer_is_ignored(postgres: Any,
                                                                      gunicorn_factory: Any) -> None:
    srv = gunicorn_factory(base_env(postgres, ORGCAST_AUTH_FAILURES="3"))  # the default: no proxy trusted
    assert admin_warnings(srv) == []
    for i in range(3):
        assert connect_raw(srv.port, f"guess-{i}", forwarded=f"203.0.113.{i}") == "token_invalid"
    assert connect_raw(srv.port, "tok-alice", forwarded="198.51.100.7") == "rate_limited"
    # The operator is told, once in the log and on /admin for as long as the worker lives.
    assert srv.output().count("which is not in ORGCAST_TRUSTED_PROXIES") == 1
    assert [w for w in admin_warnings(srv) if "ORGCAST_TRUSTED_PROXIES" in w], admin_warnings(srv)


def admin_warnings(srv: Any) -> list[str]:
    reply = requests.get(f"{srv.url}/admin/stats", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)
    assert reply.status_code == 200, reply.text
    warnings: list[str] = reply.json()["warnings"]
    return warnings


def test_behind_a_trusted_proxy_each_forwarded_client_is_counted_apart(postgres: Any,
                                                                      gunicorn_factory: Any) -> None:
    srv = gunicorn_factory(base_env(postgres, ORGCAST_AUTH_FAILURES="3", ORGCAST_TRUSTED_PROXIES="127.0.0.0/8"))
    for i in range(3):
        assert connect_raw(srv.port, f"guess-{i}", forwarded="198.51.100.1") == "token_invalid"
    assert connect_raw(srv.port, "tok-alice", forwarded="198.51.100.1") == "rate_limited"
    assert connect_raw(srv.port, "tok-alice", forwarded="198.51.100.2") == "ok"
    # The hop the proxy adds is the client: what the client wrote before it is not trusted.
    assert connect_raw(srv.port, "tok-alice", forwarded="198.51.100.2, 198.51.100.1") == "rate_limited"
    assert admin_warnings(srv) == []


# --- sessions an address may hold unadmitted ------------------------------------------------------------


def test_an_address_holds_a_bounded_number_of_unadmitted_sessions(postgres: Any, gunicorn_factory: Any) -> None:
    srv = gunicorn_factory(base_env(postgres, ORGCAST_MAX_PENDING_PER_ADDRESS="5"))
    held = [RawSession.connect(srv.port) for _ in range(5)]
    try:
        reply = raw_http(srv.port, upgrade_request("/socket.io/?EIO=4&transport=websocket"))
        assert reply.status == 429 and reply.json()["error"]["code"] == "rate_limited"
        polling = requests.get(f"{srv.url}/socket.io/?EIO=4&transport=polling", timeout=5)
        assert polling.status_code == 429
        other = RawSession.connect(srv.port, source="127.0.0.2")  # another address: accepted
        other.close()
        # An admitted session no longer counts.
        assert held[0].connect_socketio({"token": "tok-alice", "organizationId": "org-a"}).startswith("40{")
        extra = RawSession.connect(srv.port)
        extra.close()
    finally:
        for raw in held:
            raw.close()


# --- a reconnect storm ------------------------------------------------------------------------------------


def storm(port: int, auths: list[dict[str, str]]) -> tuple[list[str], float]:
    """Connect one raw socket per auth, all at once; return the answers and how long it took."""
    answers: list[str] = [""] * len(auths)
    opened: list[RawSession | None] = [None] * len(auths)
    for i in range(len(auths)):
        opened[i] = RawSession.connect(port)
    barrier = threading.Barrier(len(auths))

    def one(i: int) -> None:
        raw = opened[i]
        assert raw is not None
        barrier.wait(10)
        answers[i] = raw.connect_socketio(auths[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(auths))]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    took = time.monotonic() - started
    for raw in opened:
        if raw is not None:
            raw.close()
    return answers, took


def test_identical_lookups_in_flight_are_coalesced(logged_postgres: ThrowawayPostgres,
                                                  gunicorn_factory: Any) -> None:
    # No cache: only coalescing can keep 60 sockets of one token to one query.
    # The lookup sleeps 0.3 s, so that they really are in flight together.
    slow = ("SELECT user_id, expires > NOW() AS active, expires FROM oauth_access_tokens, "
            "(SELECT pg_sleep(0.3)) AS slow WHERE access_token = %(token)s")
    srv = gunicorn_factory(base_env(logged_postgres, ORGCAST_AUTH_CACHE_TTL="0", ORGCAST_TOKEN_SQL=slow))
    answers, _ = storm(srv.port, [{"token": "tok-alice", "organizationId": "org-a"}] * 60)
    assert answers == [a for a in answers if a.startswith("40{")] and len(answers) == 60
    assert 1 <= lookups(logged_postgres, "tok-alice") <= 10


def test_a_reconnect_storm_of_a_few_users_costs_a_few_queries(logged_postgres: ThrowawayPostgres,
                                                              gunicorn_factory: Any) -> None:
    srv = gunicorn_factory(base_env(logged_postgres, ORGCAST_AUTH_CACHE_TTL="10"))
    tokens = ["tok-alice", "tok-bob", "tok-dave"]
    auths = [{"token": tokens[i % 3], "organizationId": "org-a"} for i in range(150)]
    answers, took = storm(srv.port, auths)
    assert all(a.startswith("40{") for a in answers), [a for a in answers if not a.startswith("40{")][:3]
    assert lookups(logged_postgres) <= 3 * 3  # a few per token at most, not one per socket
    assert took < 20
    assert re.search(r"orgcast_token", (logged_postgres.root / "server.log").read_text())


# --- graceful stop and reload ------------------------------------------------------------------------------


def test_sigterm_delivers_what_was_accepted_then_closes_every_session(postgres: Any, tmp_path: Any,
                                                                      listen: Any) -> None:
    import signal

    from cluster import Cluster

    srv = start_gunicorn(base_env(postgres, WEB_CONCURRENCY="2", ORGCAST_LOG_LEVEL="debug"), tmp_path)
    try:
        cluster = Cluster([srv], [2])
        cluster.wait_listening()
        bob = {"token": "tok-bob", "organizationId": "org-a"}
        sockets = [listener for listener, _, _ in cluster.spread(listen, bob, per_worker=2)]
        accepted: list[tuple[int, float]] = []
        stop = threading.Event()

        def publisher() -> None:
            for seq in itertools.count():
                if stop.is_set():
                    return
                try:
                    reply = requests.post(f"{srv.url}/api/v1/organizations/org-a/events",
                                          json={"event": "news", "data": seq},
                                          headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5)
                except requests.RequestException:
                    return
                if reply.status_code == 202:
                    accepted.append((seq, time.monotonic()))

        thread = threading.Thread(target=publisher)
        thread.start()
        time.sleep(0.5)  # a steady flow of publishes, then the signal in the middle of it
        signalled = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        srv.proc.wait(15)  # the master does not hang on open websockets
        stop.set()
        thread.join(10)
        before = [seq for seq, at in accepted if at < signalled]
        assert len(before) > 5
        for listener in sockets:
            got = []
            deadline = time.monotonic() + 10
            while True:
                name, data = listener.events.get(timeout=max(0.1, deadline - time.monotonic()))
                if name == "disconnect":
                    break
                if name == "news":
                    got.append(data)
            assert got[:len(before)] == before  # every event accepted before the signal, in order, once
            assert len(set(got)) == len(got)
    finally:
        srv.stop()


def test_a_reload_hands_official_clients_over_to_the_new_workers(postgres: Any, gunicorn_factory: Any,
                                                                js_client: Any) -> None:
    import signal

    from throwaway import children_of

    srv = gunicorn_factory(base_env(postgres))
    (old_worker,) = children_of(srv.proc.pid)
    client = js_client(srv.url, auth={"token": "tok-alice", "organizationId": "org-a"},
                       transports=["websocket"], reconnection=True, reconnectionDelay=100)
    client.next("connect")
    srv.proc.send_signal(signal.SIGHUP)
    assert client.next("disconnect")["reason"] == "transport close"  # not "io server disconnect": it reconnects
    client.next("connect", timeout=15)
    deadline = time.monotonic() + 10
    while old_worker in children_of(srv.proc.pid):  # the old worker drains, then exits
        assert time.monotonic() < deadline, "the old worker did not exit"
        time.sleep(0.05)
    assert srv.alive()
    deadline = time.monotonic() + 10
    while publish(srv, "org-a", "news", "after the reload").status_code != 202:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert client.next("event")["args"][:1] == ["after the reload"]


def test_with_redis_failures_are_counted_across_instances(postgres: Any, redis_server: Any,
                                                          gunicorn_factory: Any) -> None:
    env = base_env(postgres, REDIS_URL=redis_server.url, ORGCAST_AUTH_FAILURES="3")
    first, second = gunicorn_factory(env), gunicorn_factory(env)
    source = "127.0.0.5"  # an address no other test used against this Redis
    for i in range(3):
        assert connect_raw((first, second)[i % 2].port, f"guess-{i}", source=source) == "token_invalid"
    assert connect_raw(first.port, "tok-alice", source=source) == "rate_limited"
    assert connect_raw(second.port, "tok-alice", source=source) == "rate_limited"
    assert connect_raw(second.port, "tok-alice", source="127.0.0.6") == "ok"
