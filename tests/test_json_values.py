"""Every JSON value a backend publishes reaches the client's handler as exactly
that value, as one argument: compared argument by argument, with the official
socket.io-client (Node) and with python-socketio's client. With recovery on
(the default) the offset follows as the last argument, as Node's Socket.IO
appends it; with ORGCAST_RECOVERY=false the value is the only argument."""

from __future__ import annotations

import json
import queue
from typing import Any

import pytest
import requests
import socketio
from conftest import API_KEY, Server, base_env, start_gunicorn

VALUES: list[Any] = [
    {"title": "an object", "nested": {"list": [1, 2, {"x": None}]}},
    [1, "two", None, True, {"three": 3}],
    [],
    {},
    "a string",
    "",
    0,
    -17,
    3.25,
    12345678901234567890,
    True,
    False,
    None,
    "unicode: é ü 漢字 🙂 \u2028",
    [None],
]


def publish_raw(server: Server, body: dict[str, Any]) -> None:
    reply = requests.post(f"{server.url}/api/v1/organizations/org-a/events", json=body,
                          headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5)
    assert reply.status_code == 202, reply.text


class ArgsRecorder:
    """A python-socketio client that keeps every event's full argument tuple."""

    def __init__(self, url: str) -> None:
        self.events: queue.Queue[tuple[str, tuple[Any, ...]]] = queue.Queue()
        self.client = socketio.Client(reconnection=False)
        self.client.on("*", lambda event, *args: self.events.put((event, args)))
        self.client.connect(url, transports=["websocket"], wait_timeout=10,
                            auth={"token": "tok-alice", "organizationId": "org-a"})

    def next(self) -> tuple[str, tuple[Any, ...]]:
        return self.events.get(timeout=5)


@pytest.fixture(scope="module", params=["recovery", "no-recovery"])
def server(request: pytest.FixtureRequest, postgres: Any, tmp_path_factory: Any) -> Any:
    env = base_env(postgres, ORGCAST_RECOVERY="true" if request.param == "recovery" else "false")
    srv = start_gunicorn(env, tmp_path_factory.mktemp(request.param))
    srv.recovery = request.param == "recovery"  # type: ignore[attr-defined]
    yield srv
    srv.stop()


def data_of(server: Server, args: list[Any] | tuple[Any, ...]) -> list[Any]:
    """The arguments without the offset (recovery on: a string, always last)."""
    if not server.recovery:  # type: ignore[attr-defined]
        return list(args)
    assert len(args) >= 1 and isinstance(args[-1], str), args
    return list(args[:-1])


@pytest.fixture
def recorder(server: Server) -> Any:
    rec = ArgsRecorder(server.url)
    yield rec
    rec.client.disconnect()


def test_python_client_receives_each_value_as_one_argument(server: Server, recorder: ArgsRecorder) -> None:
    for value in VALUES:
        publish_raw(server, {"event": "news", "data": value})
        event, args = recorder.next()
        assert (event, data_of(server, args)) == ("news", [value]), value


def test_a_body_without_data_publishes_null(server: Server, recorder: ArgsRecorder) -> None:
    publish_raw(server, {"event": "news"})
    event, args = recorder.next()
    assert (event, data_of(server, args)) == ("news", [None])


def test_official_client_receives_each_value_as_one_argument(server: Server, js_client: Any) -> None:
    client = js_client(server.url, auth={"token": "tok-alice", "organizationId": "org-a"},
                       transports=["websocket"])
    client.next("connect")
    for value in VALUES:
        publish_raw(server, {"event": "news", "data": value})
        # JSON.stringify of the handler's arguments: [] would mean "no argument".
        received = data_of(server, client.next("event")["args"])
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**53:
            assert len(received) == 1 and received[0] == pytest.approx(float(value)), value
        else:
            assert received == [value], value
    publish_raw(server, {"event": "news"})
    assert data_of(server, client.next("event")["args"]) == [None]


def test_each_value_published_with_pg_notify_arrives_as_one_argument(server: Server, postgres: Any,
                                                                      recorder: ArgsRecorder) -> None:
    """The same on the SQL path (``pg_notify('orgcast', …)``, heard by the leader, sent over the bus)."""
    for value in VALUES:
        payload = json.dumps({"room": "organization.org-a", "event": "news", "data": value})
        postgres.psql("SELECT pg_notify('orgcast', '" + payload.replace("'", "''") + "')")
        event, args = recorder.next()
        assert (event, data_of(server, args)) == ("news", [value]), value
