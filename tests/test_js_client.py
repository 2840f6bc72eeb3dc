"""The official socket.io-client 4.x (Node.js), against the real gunicorn.

The client comes from the npm registry through the Makefile (the same copy
the demo page serves); these tests fail, not skip, when it is missing.
"""

from __future__ import annotations

from typing import Any

import pytest
from conftest import event_data, publish


@pytest.mark.parametrize("transports", [["websocket"], ["polling"], ["polling", "websocket"]])
def test_official_client_connects_and_receives_news(gunicorn_server: Any, js_client: Any,
                                                    transports: list[str]) -> None:
    client = js_client(gunicorn_server.url, auth={"token": "tok-alice", "organizationId": "org-a"},
                       transports=transports)
    client.next("connect")
    assert publish(gunicorn_server, "org-a", data={"hello": transports}).status_code == 202
    event = client.next("event")
    assert event["name"] == "news" and event_data(event) == [{"hello": transports}]


@pytest.mark.parametrize(
    ("auth", "code"),
    [
        ({"organizationId": "org-a"}, "token_missing"),
        ({"token": "tok-alice"}, "organization_missing"),
        ({"token": "tok-alice", "organizationId": "bad id"}, "organization_invalid"),
        ({"token": "no-such-token", "organizationId": "org-a"}, "token_invalid"),
        ({"token": "tok-expired", "organizationId": "org-a"}, "token_expired"),
        ({"token": "tok-carol", "organizationId": "org-a"}, "forbidden"),
    ],
)
def test_official_client_sees_the_refusal_code(gunicorn_server: Any, js_client: Any,
                                               auth: dict[str, str], code: str) -> None:
    client = js_client(gunicorn_server.url, auth=auth, transports=["websocket"])
    error = client.next("connect_error", "connect")
    assert error["type"] == "connect_error"
    assert error["data"] == {"code": code}
    assert error["message"] and error["message"] != code


def test_official_client_with_query_string(gunicorn_server: Any, js_client: Any) -> None:
    # Older frontends send credentials in the query string.
    client = js_client(gunicorn_server.url, query={"token": "tok-bob", "organizationId": "org-a"},
                       transports=["websocket"])
    client.next("connect")
    publish(gunicorn_server, "org-a", data="q")
    assert event_data(client.next("event")) == ["q"]


def test_official_client_with_bearer_header(gunicorn_server: Any, js_client: Any) -> None:
    client = js_client(gunicorn_server.url, auth={"organizationId": "org-b"},
                       extraHeaders={"Authorization": "Bearer tok-carol"}, transports=["websocket"])
    client.next("connect")
    publish(gunicorn_server, "org-b", data="h")
    assert event_data(client.next("event")) == ["h"]


def test_official_client_refused_on_another_namespace_reads_the_code(gunicorn_server: Any,
                                                                       js_client: Any) -> None:
    # The README's err.data.code snippet must not throw on a wrong namespace.
    client = js_client(gunicorn_server.url + "/admin", auth={"token": "tok-alice", "organizationId": "org-a"},
                       transports=["websocket"])
    error = client.next("connect_error", "connect")
    assert error["type"] == "connect_error"
    assert error["data"] == {"code": "namespace_invalid"}


def test_official_client_sees_a_refused_origin_as_an_error_at_once(gunicorn_server: Any,
                                                                  js_client: Any) -> None:
    # Refused before the upgrade: the client gets an error now, not a 20 s timeout.
    import time

    started = time.monotonic()
    client = js_client(gunicorn_server.url, auth={"token": "tok-alice", "organizationId": "org-a"},
                       transports=["websocket"], extraHeaders={"Origin": "https://evil.example"})
    error = client.next("connect_error", "connect", timeout=15)
    assert error["type"] == "connect_error"
    assert time.monotonic() - started < 5
