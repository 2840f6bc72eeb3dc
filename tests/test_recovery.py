"""Connection state recovery with the official socket.io-client (4.8, which takes
part by itself): a client whose transport drops gets, once it is back, every
event published meanwhile, in order and once, with ``socket.recovered`` true —
on the same worker, on another worker, on another instance, for each bus.
And the bounds: the window, the history's size and age, the authorization."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import JsClient, Server, base_env, event_data, publish, start_gunicorn, unique
from test_lifecycle import new_user

pytestmark = pytest.mark.slow

#: the client reconnects 1 s after a drop: time to publish what it will have missed
RECONNECT = {"reconnection": True, "reconnectionDelay": 1000, "reconnectionDelayMax": 1000,
             "randomizationFactor": 0, "transports": ["websocket"]}


def events(client: JsClient, until: str, timeout: float = 10.0) -> list[Any]:
    """The data of each event the client receives before an event named ``until``."""
    got = []
    while True:
        line = client.next("event", timeout=timeout)
        if line["name"] == until:
            return got
        got.append(event_data(line)[0])


def drop_and_publish(client: JsClient, server: Server, organization: str = "org-a",
                     count: int = 3) -> list[str]:
    """Cut the client's transport, publish while it is away; return what was published."""
    client.command("drop")
    # the client names it from its side; the server sees its transport close
    assert client.next("disconnect")["reason"] == "forced close"
    values = [unique("missed") for _ in range(count)]
    for value in values:
        assert publish(server, organization, "news", value).status_code == 202
    return values


@pytest.fixture(scope="module", params=["postgres", "redis"])
def bus_env(request: pytest.FixtureRequest, postgres: Any, redis_server: Any) -> dict[str, str]:
    env = base_env(postgres, ORGCAST_LOG_LEVEL="debug")
    if request.param == "redis":
        env["REDIS_URL"] = redis_server.url
    return env


@pytest.fixture(scope="module")
def instance(bus_env: dict[str, str], tmp_path_factory: Any) -> Iterator[Server]:
    srv = start_gunicorn(bus_env, tmp_path_factory.mktemp("recovery"))
    yield srv
    srv.stop()


def test_missed_events_arrive_once_in_order_and_the_socket_is_recovered(instance: Server,
                                                                      js_client: Any) -> None:
    client = js_client(instance.url, auth={"token": "tok-bob", "organizationId": "org-a"}, **RECONNECT)
    first = client.next("connect")
    assert first["recovered"] is False
    assert publish(instance, "org-a", "news", "before").status_code == 202
    assert event_data(client.next("event")) == ["before"]
    missed = drop_and_publish(client, instance)
    back = client.next("connect", timeout=10)
    assert back["recovered"] is True and back["id"] == first["id"]  # the socket keeps its id
    assert publish(instance, "org-a", "marker", "after").status_code == 202
    assert events(client, until="marker") == missed


def test_a_client_that_saw_no_event_is_recovered_too(instance: Server, js_client: Any) -> None:
    client = js_client(instance.url, auth={"token": "tok-bob", "organizationId": "org-a"}, **RECONNECT)
    assert client.next("connect")["recovered"] is False
    missed = drop_and_publish(client, instance)
    assert client.next("connect", timeout=10)["recovered"] is True
    assert publish(instance, "org-a", "marker", "after").status_code == 202
    assert events(client, until="marker") == missed


def test_a_client_of_an_older_version_or_an_unknown_pid_is_not_recovered(instance: Server,
                                                                        js_client: Any) -> None:
    from protocol import RawSession

    raw = RawSession.connect(instance.port)
    try:
        answer = raw.connect_socketio({"token": "tok-bob", "organizationId": "org-a", "pid": "no-such-pid",
                                       "offset": "1"})
        assert answer.startswith("40{") and '"pid"' in answer and "no-such-pid" not in answer
    finally:
        raw.close()


def test_recovery_on_another_instance(bus_env: dict[str, str], tmp_path: Path, js_client: Any) -> None:
    """The history and the kept sessions are in the bus backend: nginx sends the
    reconnect to the other instance (round robin), which recovers it."""
    from test_nginx import start_nginx

    servers = [start_gunicorn(bus_env, tmp_path) for _ in range(2)]
    nginx = start_nginx(tmp_path / "nginx", [s.port for s in servers])
    try:
        client = js_client(nginx.url, auth={"token": "tok-bob", "organizationId": "org-a"}, **RECONNECT)
        first = client.next("connect")
        landed = [i for i, s in enumerate(servers) if f"admitted socket {first['id']}" in s.output()]
        missed = drop_and_publish(client, servers[1])
        back = client.next("connect", timeout=10)
        assert back["recovered"] is True
        deadline = time.monotonic() + 5
        while not (again := [i for i, s in enumerate(servers)
                             if s.output().count(f"admitted socket {back['id']}") > (1 if i in landed else 0)]):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert again != landed, "nginx sent the reconnect to the same instance"
        assert publish(servers[0], "org-a", "marker", "after").status_code == 202
        assert events(client, until="marker") == missed
    finally:
        nginx.stop()
        for server in servers:
            server.stop()


def test_recovery_on_another_worker(bus_env: dict[str, str], tmp_path: Path, js_client: Any) -> None:
    import re

    srv = start_gunicorn({**bus_env, "WEB_CONCURRENCY": "2"}, tmp_path)
    try:
        client = js_client(srv.url, auth={"token": "tok-bob", "organizationId": "org-a"}, **RECONNECT)
        sid = client.next("connect")["id"]

        def worker_of(socket_id: str, nth: int) -> str:
            deadline = time.monotonic() + 5
            while len(found := re.findall(rf"\[(\d+)\] \[DEBUG\] app\.realtime\.namespace: admitted socket "
                                          rf"{re.escape(socket_id)}", srv.output())) < nth:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            return found[nth - 1]

        workers = {worker_of(sid, 1)}
        for attempt in range(2, 12):  # the kernel picks the worker: go on until another one did
            missed = drop_and_publish(client, srv, count=2)
            back = client.next("connect", timeout=10)
            assert back["recovered"] is True and back["id"] == sid
            assert publish(srv, "org-a", "marker", f"m{attempt}").status_code == 202
            assert events(client, until="marker") == missed
            workers.add(worker_of(sid, attempt))
            if len(workers) == 2:
                break
        assert len(workers) == 2, "every reconnect landed on the same worker"
    finally:
        srv.stop()


def test_after_the_window_the_client_connects_but_is_not_recovered(bus_env: dict[str, str],
                                                                  gunicorn_factory: Any,
                                                                  js_client: Any) -> None:
    srv = gunicorn_factory({**bus_env, "ORGCAST_RECOVERY_WINDOW": "1"})
    slow = {**RECONNECT, "reconnectionDelay": 2500, "reconnectionDelayMax": 2500}
    client = js_client(srv.url, auth={"token": "tok-bob", "organizationId": "org-a"}, **slow)
    assert client.next("connect")["recovered"] is False
    drop_and_publish(client, srv, count=1)
    assert client.next("connect", timeout=10)["recovered"] is False
    assert publish(srv, "org-a", "marker", "after").status_code == 202
    assert events(client, until="marker") == []  # what it missed is not replayed


def test_a_token_that_expired_meanwhile_is_refused(instance: Server, postgres: Any, js_client: Any) -> None:
    _, token = new_user(postgres, 2)
    slow = {**RECONNECT, "reconnectionDelay": 3000, "reconnectionDelayMax": 3000}
    client = js_client(instance.url, auth={"token": token, "organizationId": "org-a"}, **slow)
    client.next("connect")
    drop_and_publish(client, instance, count=1)
    refused = client.next("connect_error", "connect", timeout=10)
    assert refused["type"] == "connect_error" and refused["data"] == {"code": "token_expired"}


def test_an_organization_the_user_left_meanwhile_is_not_recovered(instance: Server, postgres: Any,
                                                                js_client: Any) -> None:
    user, token = new_user(postgres, 3600, ("org-a", "org-b"))
    client = js_client(instance.url, auth={"token": token, "organizationId": "org-a"}, **RECONNECT)
    client.next("connect")
    client.command('emit ["subscribe", {"organizationId": "org-b"}]')
    assert client.next("ack")["args"] == [{"ok": True, "room": "organization.org-b"}]
    client.command("drop")
    client.next("disconnect")
    postgres.psql(f"DELETE FROM organization_users WHERE organization_id = 'org-b' AND user_id = '{user}'")
    assert publish(instance, "org-b", "news", "org-b, not any more").status_code == 202
    assert publish(instance, "org-a", "news", "org-a, still").status_code == 202
    assert client.next("connect", timeout=10)["recovered"] is True
    assert publish(instance, "org-b", "news", "org-b, later").status_code == 202
    assert publish(instance, "org-a", "marker", "after").status_code == 202
    assert events(client, until="marker") == ["org-a, still"]


def test_with_recovery_off_there_is_no_pid_and_no_offset(postgres: Any, gunicorn_factory: Any,
                                                        js_client: Any) -> None:
    srv = gunicorn_factory(base_env(postgres, ORGCAST_RECOVERY="false"))
    client = js_client(srv.url, auth={"token": "tok-bob", "organizationId": "org-a"}, **RECONNECT)
    client.next("connect")
    drop_and_publish(client, srv, count=1)
    # no pid offered: the client computes `recovered` as `pid && ...`, undefined
    assert "recovered" not in client.next("connect", timeout=10)
    assert publish(srv, "org-a", "news", "plain").status_code == 202
    assert client.next("event")["args"] == ["plain"]  # no offset appended
    from protocol import RawSession

    raw = RawSession.connect(srv.port)
    try:
        answer = raw.connect_socketio({"token": "tok-bob", "organizationId": "org-a"})
        assert answer.startswith('40{"sid":') and "pid" not in answer
    finally:
        raw.close()
