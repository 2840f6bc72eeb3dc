"""Rewind (contract §5.4, issue 20): ``auth.rewind`` on connect and ``subscribe {rewind}`` give
up to N of the organization's latest events, oldest first, before any live one, each once, with
live events published meanwhile; capped at ORGCAST_REWIND_MAX; not a whole number: rewind_invalid."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import JsClient, Server, base_env, event_data, publish, start_gunicorn, unique

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["postgres", "redis"])
def server(request: pytest.FixtureRequest, postgres: Any, redis_server: Any,
           tmp_path_factory: Any) -> Iterator[Server]:
    env = base_env(postgres, ORGCAST_REWIND_MAX="5", WEB_CONCURRENCY="2")
    if request.param == "redis":
        env["REDIS_URL"] = redis_server.url
    srv = start_gunicorn(env, tmp_path_factory.mktemp("rewind"))
    yield srv
    srv.stop()


def received(client: JsClient, until: str) -> list[Any]:
    got = []
    while (line := client.next("event", timeout=15))["name"] != until:
        got.append(event_data(line)[0])
    return got


def test_a_connect_with_rewind_gets_the_latest_events_then_live_ones(server: Server, js_client: Any) -> None:
    org = "org-b"  # carol's
    old = [unique("old") for _ in range(8)]
    for value in old:
        assert publish(server, org, "news", value).status_code == 202
    client = js_client(server.url, auth={"token": "tok-carol", "organizationId": org, "rewind": 3},
                       transports=["websocket"])
    assert client.next("connect")
    assert publish(server, org, "news", "live").status_code == 202
    assert publish(server, org, "marker", "m").status_code == 202
    assert received(client, "marker") == [*old[-3:], "live"]


def test_a_rewind_larger_than_the_history_or_the_cap(server: Server, js_client: Any) -> None:
    org = "org-b"
    values = [unique("capped") for _ in range(7)]
    for value in values:
        assert publish(server, org, "news", value).status_code == 202
    client = js_client(server.url, auth={"token": "tok-carol", "organizationId": org, "rewind": 1000},
                       transports=["websocket"])
    client.next("connect")
    assert publish(server, org, "marker", "m").status_code == 202
    assert received(client, "marker") == values[-5:]  # ORGCAST_REWIND_MAX=5
    at_the_cap = js_client(server.url, auth={"token": "tok-carol", "organizationId": org, "rewind": 5},
                           transports=["websocket"])
    at_the_cap.next("connect")
    # Exactly at the cap (5): the 5 latest are the last 4 values and the first marker.
    assert received(at_the_cap, "marker") == values[-4:]


def test_subscribe_with_rewind_while_events_are_published(server: Server, js_client: Any) -> None:
    """Events of the organization published during the rewind arrive after it, none missed, none twice."""
    before = [unique("before") for _ in range(4)]
    for value in before:
        assert publish(server, "org-b", "news", value).status_code == 202
    client = js_client(server.url, auth={"token": "tok-dave", "organizationId": "org-a"}, transports=["websocket"])
    client.next("connect")
    stop = threading.Event()
    during: list[str] = []

    def flood() -> None:
        while not stop.is_set() and len(during) < 200:
            value = unique("during")
            if publish(server, "org-b", "news", value).status_code == 202:
                during.append(value)

    thread = threading.Thread(target=flood)
    thread.start()
    try:
        client.command('emit ["subscribe", {"organizationId": "org-b", "rewind": 3}]')
        lines = []
        while (line := client.next("ack", "event", timeout=15))["type"] != "ack":
            lines.append(line)
        assert line["args"] == [{"ok": True, "room": "organization.org-b"}]
    finally:
        stop.set()
        thread.join(15)
    assert publish(server, "org-b", "marker", "m").status_code == 202
    got = [event_data(line)[0] for line in lines] + received(client, "marker")
    published = [*before, *during]
    # The 3 latest when it subscribed, then every later one: a suffix of what was published.
    assert len(got) >= 3
    assert got == published[len(published) - len(got):], "missed, twice or out of order"


@pytest.mark.parametrize("rewind", [-1, 1.5, "3", True, [1]])
def test_a_rewind_that_is_not_a_whole_number_is_refused(server: Server, rewind: Any) -> None:
    from protocol import RawSession

    raw = RawSession.connect(server.port)
    try:
        answer = raw.connect_socketio({"token": "tok-bob", "organizationId": "org-a", "rewind": rewind})
        assert answer.startswith("44") and json.loads(answer[2:])["data"] == {"code": "rewind_invalid"}
        ok = raw.connect_socketio({"token": "tok-bob", "organizationId": "org-a", "rewind": 0})
        assert ok.startswith("40{")
        raw.send('421["subscribe",{"organizationId":"org-b","rewind":-2}]')
        ack = raw.recv()
        assert isinstance(ack, str) and '"rewind_invalid"' in ack
    finally:
        raw.close()
