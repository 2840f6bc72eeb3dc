"""Who receives what: organization isolation, user rooms and disconnect-user.

Every check compares a socket's received events with exactly what it may
see. Absence is proved by a barrier, not by waiting: after the events under
test, a final ``marker`` event is published to rooms every socket is in, and
each socket's list is read up to its marker. Events on one socket arrive in
the order one process sent them, so an event missing at the marker was not
delivered.
"""

from __future__ import annotations

from typing import Any

import pytest
import requests
from conftest import API_KEY, Server, publish, unique

pytestmark = pytest.mark.usefixtures("no_leaked_threads")



def api_post(server: Server, path: str, body: Any = None) -> Any:
    return requests.post(f"{server.url}/api/v1/{path}", json=body,
                         headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)


def to_org(server: Server, org: str, event: str, data: Any) -> None:
    response = publish(server, org, event, data)
    assert response.status_code == 202, response.text


def to_user(server: Server, user: str, event: str, data: Any) -> None:
    response = api_post(server, f"users/{user}/events", {"event": event, "data": data})
    assert response.status_code == 202, response.text


def barrier(server: Server, sockets: dict[str, Any]) -> dict[str, list[tuple[str, Any]]]:
    """Publish a marker to both organizations; return each socket's events before it."""
    marker = unique("marker")
    for org in ("org-a", "org-b"):
        to_org(server, org, "marker", marker)
    return {name: listener.events_before("marker", marker) for name, listener in sockets.items()}


@pytest.fixture
def sockets(gunicorn_server: Server, listen: Any, transports: list[str]) -> dict[str, Any]:
    """alice and bob in org-a, carol in org-b, dave once in each organization."""
    admitted = {
        "alice": listen(gunicorn_server.url, transports=transports,
                        auth={"token": "tok-alice", "organizationId": "org-a"}),
        "bob": listen(gunicorn_server.url, transports=transports,
                      auth={"token": "tok-bob", "organizationId": "org-a"}),
        "carol": listen(gunicorn_server.url, transports=transports,
                        auth={"token": "tok-carol", "organizationId": "org-b"}),
        "dave@org-a": listen(gunicorn_server.url, transports=transports,
                             auth={"token": "tok-dave", "organizationId": "org-a"}),
        "dave@org-b": listen(gunicorn_server.url, transports=transports,
                             auth={"token": "tok-dave", "organizationId": "org-b"}),
    }
    for name, listener in admitted.items():
        assert listener.client.connected, (name, listener.connect_error)
    return admitted


def test_organization_events_reach_exactly_that_organization(gunicorn_server: Server,
                                                             sockets: dict[str, Any]) -> None:
    to_org(gunicorn_server, "org-a", "news", {"n": "a1"})
    to_org(gunicorn_server, "org-b", "news", {"n": "b1"})
    to_org(gunicorn_server, "org-a", "alert", {"n": "a2"})
    to_org(gunicorn_server, "org-b", "alert", [1, "b2"])
    to_org(gunicorn_server, "org-c", "news", {"n": "c1"})  # nobody listens to org-c
    to_org(gunicorn_server, "org-a", "news", None)

    org_a = [("news", {"n": "a1"}), ("alert", {"n": "a2"}), ("news", None)]
    org_b = [("news", {"n": "b1"}), ("alert", [1, "b2"])]
    assert barrier(gunicorn_server, sockets) == {
        "alice": org_a, "bob": org_a, "dave@org-a": org_a,
        "carol": org_b, "dave@org-b": org_b,
    }


def test_user_events_reach_every_socket_of_that_user_and_nobody_else(
        gunicorn_server: Server, sockets: dict[str, Any]) -> None:
    to_user(gunicorn_server, "dave", "notice", {"for": "dave"})
    to_user(gunicorn_server, "alice", "notice", {"for": "alice"})
    to_user(gunicorn_server, "carol", "notice", {"for": "carol"})
    to_user(gunicorn_server, "eve", "notice", {"for": "eve"})  # eve has no socket
    to_user(gunicorn_server, "dave", "notice", {"for": "dave", "n": 2})

    dave = [("notice", {"for": "dave"}), ("notice", {"for": "dave", "n": 2})]
    assert barrier(gunicorn_server, sockets) == {
        "alice": [("notice", {"for": "alice"})],
        "bob": [],
        "carol": [("notice", {"for": "carol"})],
        "dave@org-a": dave,
        "dave@org-b": dave,
    }


def test_mixed_organization_and_user_events_arrive_exactly_and_in_order(
        gunicorn_server: Server, sockets: dict[str, Any]) -> None:
    to_org(gunicorn_server, "org-a", "news", 1)
    to_user(gunicorn_server, "dave", "news", 2)
    to_org(gunicorn_server, "org-b", "news", 3)
    to_user(gunicorn_server, "bob", "news", 4)
    to_org(gunicorn_server, "org-a", "news", 5)
    to_user(gunicorn_server, "carol", "news", 6)

    def events(*values: int) -> list[tuple[str, Any]]:
        return [("news", v) for v in values]

    assert barrier(gunicorn_server, sockets) == {
        "alice": events(1, 5),
        "bob": events(1, 4, 5),
        "carol": events(3, 6),
        "dave@org-a": events(1, 2, 5),
        "dave@org-b": events(2, 3),
    }


def test_disconnect_user_disconnects_every_socket_of_that_user(gunicorn_server: Server,
                                                               sockets: dict[str, Any]) -> None:
    response = api_post(gunicorn_server, "users/dave/disconnect")
    assert response.status_code == 202
    assert response.json()["status"] == "accepted"

    for name in ("dave@org-a", "dave@org-b"):
        sockets[name].wait_for("disconnect", timeout=5)
        assert not sockets[name].client.connected, name


def test_disconnect_user_leaves_other_users_connected_and_receiving(
        gunicorn_server: Server, sockets: dict[str, Any]) -> None:
    assert api_post(gunicorn_server, "users/dave/disconnect").status_code == 202
    for name in ("dave@org-a", "dave@org-b"):
        sockets[name].wait_for("disconnect", timeout=5)

    to_org(gunicorn_server, "org-a", "news", "a")
    to_org(gunicorn_server, "org-b", "news", "b")
    to_user(gunicorn_server, "alice", "notice", "alice")
    to_user(gunicorn_server, "dave", "notice", "dave")  # nobody left to receive it

    others = {name: sockets[name] for name in ("alice", "bob", "carol")}
    assert barrier(gunicorn_server, others) == {
        "alice": [("news", "a"), ("notice", "alice")],
        "bob": [("news", "a")],
        "carol": [("news", "b")],
    }
    for name, listener in others.items():
        assert listener.client.connected, name
    for name in ("dave@org-a", "dave@org-b"):
        assert not sockets[name].client.connected, name
        assert [event for event, _ in sockets[name].drain()] == [], name


def test_disconnect_of_a_user_without_sockets_is_accepted(gunicorn_server: Server,
                                                          sockets: dict[str, Any]) -> None:
    assert api_post(gunicorn_server, "users/eve/disconnect").status_code == 202
    to_org(gunicorn_server, "org-a", "news", "still here")
    received = barrier(gunicorn_server, sockets)
    assert received["alice"] == [("news", "still here")]
    assert received["carol"] == []
    assert all(listener.client.connected for listener in sockets.values())


def test_disconnected_user_may_connect_again(gunicorn_server: Server, listen: Any,
                                            sockets: dict[str, Any],
                                            transports: list[str]) -> None:
    assert api_post(gunicorn_server, "users/carol/disconnect").status_code == 202
    sockets["carol"].wait_for("disconnect", timeout=5)

    again = listen(gunicorn_server.url, transports=transports,
                   auth={"token": "tok-carol", "organizationId": "org-b"})
    to_user(gunicorn_server, "carol", "notice", "welcome back")
    assert barrier(gunicorn_server, {"carol": again, "dave@org-b": sockets["dave@org-b"]}) == {
        "carol": [("notice", "welcome back")],
        "dave@org-b": [],
    }
