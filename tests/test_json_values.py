"""Every JSON value a backend publishes reaches the client's handler as exactly
that value, as one argument: compared argument by argument, with the official
socket.io-client (Node) and with python-socketio's client."""

from __future__ import annotations

import queue
from typing import Any

import pytest
import requests
import socketio
from conftest import API_KEY, Server

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


@pytest.fixture
def recorder(gunicorn_server: Server) -> Any:
    rec = ArgsRecorder(gunicorn_server.url)
    yield rec
    rec.client.disconnect()


def test_python_client_receives_each_value_as_one_argument(gunicorn_server: Server,
                                                           recorder: ArgsRecorder) -> None:
    for value in VALUES:
        publish_raw(gunicorn_server, {"event": "news", "data": value})
        assert recorder.next() == ("news", (value,)), value


def test_a_body_without_data_publishes_null(gunicorn_server: Server, recorder: ArgsRecorder) -> None:
    publish_raw(gunicorn_server, {"event": "news"})
    assert recorder.next() == ("news", (None,))


def test_official_client_receives_each_value_as_one_argument(gunicorn_server: Server,
                                                             js_client: Any) -> None:
    client = js_client(gunicorn_server.url, auth={"token": "tok-alice", "organizationId": "org-a"},
                       transports=["websocket"])
    client.next("connect")
    for value in VALUES:
        publish_raw(gunicorn_server, {"event": "news", "data": value})
        event = client.next("event")
        # JSON.stringify of the handler's arguments: [] would mean "no argument".
        expected = float(value) if isinstance(value, int) and abs(value) > 2**53 else value
        received = event["args"]
        if isinstance(expected, float) and not isinstance(value, float):
            assert len(received) == 1 and received[0] == pytest.approx(expected), value
        else:
            assert received == [expected], value
    publish_raw(gunicorn_server, {"event": "news"})
    assert client.next("event")["args"] == [None]
