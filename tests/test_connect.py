"""The connect check over a real gunicorn, with real Socket.IO clients (README, "Connecting from a browser").

Every test runs over a real WebSocket and over long-polling. Admission is
proved by delivery, never by the client's own ``connected`` flag alone: a
socket is in ``organization.<id>`` and ``user.<user_id>`` when events
published to those rooms reach it. Absence is proved with a marker event
(``Listener.events_before``), never by sleeping.
"""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
import requests
from conftest import API_KEY, Server, base_env, publish, start_gunicorn, unique

pytestmark = pytest.mark.usefixtures("no_leaked_threads")



def publish_to_user(server: Server, user_id: str, event: str = "news", data: Any = None) -> Any:
    return requests.post(f"{server.url}/api/v1/users/{user_id}/events",
                         json={"event": event, "data": data},
                         headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)


def assert_admitted_to(server: Server, listener: Any, organization_id: str) -> None:
    """The listener was admitted and is in ``organization.<organization_id>``."""
    assert listener.connect_error is None, listener.connect_error
    assert listener.client.connected
    value = unique("admitted")
    assert publish(server, organization_id, "news", {"id": value}).status_code == 202
    assert listener.wait_for("news") == {"id": value}


def assert_refused(listener: Any, code: str) -> None:
    """The listener got a CONNECT_ERROR with ``code`` and a human message."""
    assert listener.refusal_code == code, listener.connect_error
    message = listener.connect_error.get("message")
    assert isinstance(message, str) and message.strip()
    assert message != code and " " in message.strip()
    assert not listener.client.connected


# --- refusals -------------------------------------------------------------------

REFUSALS = [
    pytest.param(None, "token_missing", id="token_missing-no-auth"),
    pytest.param({}, "token_missing", id="token_missing-empty-auth"),
    pytest.param({"organizationId": "org-a"}, "token_missing", id="token_missing"),
    pytest.param({"token": "", "organizationId": "org-a"}, "token_missing",
                 id="token_missing-empty-token"),
    pytest.param({"token": "tok-alice"}, "organization_missing", id="organization_missing"),
    pytest.param({"token": "tok-alice", "organizationId": ""}, "organization_missing",
                 id="organization_missing-empty"),
    pytest.param({"token": "tok-alice", "organizationId": None}, "organization_missing",
                 id="organization_missing-null"),
    pytest.param({"token": "tok-alice", "organizationId": "a b"}, "organization_invalid",
                 id="organization_invalid-space"),
    pytest.param({"token": "tok-alice", "organizationId": "x" * 65}, "organization_invalid",
                 id="organization_invalid-65-chars"),
    pytest.param({"token": "tok-alice", "organizationId": "é"}, "organization_invalid",
                 id="organization_invalid-non-ascii"),
    pytest.param({"token": "tok-alice", "organizationId": "../x"}, "organization_invalid",
                 id="organization_invalid-path"),
    pytest.param({"token": "tok-alice", "organizationId": "org.a"}, "organization_invalid",
                 id="organization_invalid-dot"),
    pytest.param({"token": "tok-alice", "organizationId": ["org-a"]}, "organization_invalid",
                 id="organization_invalid-list"),
    pytest.param({"token": "tok-alice", "organizationId": True}, "organization_invalid",
                 id="organization_invalid-boolean"),
    pytest.param({"token": "tok-alice", "organizationId": {"id": "org-a"}},
                 "organization_invalid", id="organization_invalid-object"),
    pytest.param({"token": "tok-nobody", "organizationId": "org-a"}, "token_invalid",
                 id="token_invalid"),
    pytest.param({"token": "t" * 5000, "organizationId": "org-a"}, "token_invalid",
                 id="token_invalid-huge"),
    pytest.param({"token": "tok-expired", "organizationId": "org-a"}, "token_expired",
                 id="token_expired"),
    pytest.param({"token": "tok-carol", "organizationId": "org-a"}, "forbidden",
                 id="forbidden"),
    pytest.param({"token": "tok-alice", "organizationId": "org-nobody"}, "forbidden",
                 id="forbidden-unknown-organization"),
    # The checks run in the README's order: the first failing one is reported.
    pytest.param({"token": "tok-nobody"}, "organization_missing",
                 id="order-organization_missing-before-token_invalid"),
    pytest.param({"token": "tok-nobody", "organizationId": "a b"}, "organization_invalid",
                 id="order-organization_invalid-before-token_invalid"),
    pytest.param({"token": "tok-expired", "organizationId": "org-b"}, "token_expired",
                 id="order-token_expired-before-forbidden"),
]


@pytest.mark.parametrize(("auth", "code"), REFUSALS)
def test_refusal_carries_code_and_human_message(gunicorn_server: Server, listen: Any,
                                                transports: list[str], auth: Any,
                                                code: str) -> None:
    kwargs = {} if auth is None else {"auth": auth}
    listener = listen(gunicorn_server.url, transports=transports, **kwargs)
    assert_refused(listener, code)


@pytest.mark.parametrize(("query", "code"), [
    pytest.param("organizationId=org-a", "token_missing", id="token_missing"),
    pytest.param("token=tok-alice", "organization_missing", id="organization_missing"),
    pytest.param("token=tok-alice&organizationId=a%20b", "organization_invalid",
                 id="organization_invalid"),
    pytest.param("token=tok-nobody&organizationId=org-a", "token_invalid", id="token_invalid"),
    pytest.param("token=tok-expired&organizationId=org-a", "token_expired", id="token_expired"),
    pytest.param("token=tok-carol&organizationId=org-a", "forbidden", id="forbidden"),
])
def test_refusal_of_query_string_credentials(gunicorn_server: Server, listen: Any,
                                             transports: list[str], query: str,
                                             code: str) -> None:
    listener = listen(f"{gunicorn_server.url}?{query}", transports=transports)
    assert_refused(listener, code)


def test_refused_socket_receives_nothing(gunicorn_server: Server, listen: Any,
                                         transports: list[str]) -> None:
    refused = listen(gunicorn_server.url, transports=transports,
                     auth={"token": "tok-carol", "organizationId": "org-a"})
    assert_refused(refused, "forbidden")
    witness = listen(gunicorn_server.url, transports=transports,
                     auth={"token": "tok-bob", "organizationId": "org-a"})
    marker = unique("marker")
    assert publish(gunicorn_server, "org-a", "news", {"secret": 1}).status_code == 202
    assert publish(gunicorn_server, "org-a", "marker", marker).status_code == 202
    assert witness.events_before("marker", marker) == [("news", {"secret": 1})]
    assert refused.drain() == []


# --- where credentials come from ---------------------------------------------------


def test_auth_payload_credentials_admit(gunicorn_server: Server, listen: Any,
                                        transports: list[str]) -> None:
    listener = listen(gunicorn_server.url, transports=transports,
                      auth={"token": "tok-alice", "organizationId": "org-a"})
    assert_admitted_to(gunicorn_server, listener, "org-a")


def test_query_string_credentials_admit(gunicorn_server: Server, listen: Any,
                                        transports: list[str]) -> None:
    listener = listen(f"{gunicorn_server.url}?token=tok-carol&organizationId=org-b",
                      transports=transports)
    assert_admitted_to(gunicorn_server, listener, "org-b")


def test_bearer_header_with_organization_from_auth_admits(gunicorn_server: Server, listen: Any,
                                                          transports: list[str]) -> None:
    listener = listen(gunicorn_server.url, transports=transports,
                      headers={"Authorization": "Bearer tok-bob"},
                      auth={"organizationId": "org-a"})
    assert_admitted_to(gunicorn_server, listener, "org-a")


def test_bearer_header_with_organization_from_query_admits(gunicorn_server: Server, listen: Any,
                                                           transports: list[str]) -> None:
    listener = listen(f"{gunicorn_server.url}?organizationId=org-b", transports=transports,
                      headers={"Authorization": "Bearer tok-dave"})
    assert_admitted_to(gunicorn_server, listener, "org-b")


def test_bearer_header_without_organization_is_organization_missing(
        gunicorn_server: Server, listen: Any, transports: list[str]) -> None:
    listener = listen(gunicorn_server.url, transports=transports,
                      headers={"Authorization": "Bearer tok-bob"})
    assert_refused(listener, "organization_missing")


def test_non_bearer_authorization_header_is_not_a_token(gunicorn_server: Server, listen: Any,
                                                        transports: list[str]) -> None:
    listener = listen(gunicorn_server.url, transports=transports,
                      headers={"Authorization": "Basic tok-bob"},
                      auth={"organizationId": "org-a"})
    assert_refused(listener, "token_missing")


# (query string, auth, Authorization header, organization admitted to or refusal code)
PRECEDENCE = [
    pytest.param("token=tok-nobody", {"token": "tok-alice", "organizationId": "org-a"}, None,
                 "org-a", id="auth-token-good-query-token-bad"),
    pytest.param("token=tok-alice", {"token": "tok-nobody", "organizationId": "org-a"}, None,
                 "token_invalid", id="auth-token-bad-query-token-good"),
    pytest.param("token=tok-alice&organizationId=org-a", None, None,
                 "org-a", id="auth-absent-query-good"),
    pytest.param("token=tok-alice", {"organizationId": "org-a"}, None,
                 "org-a", id="auth-organization-query-token"),
    pytest.param("organizationId=org-a", {"token": "tok-alice"}, None,
                 "org-a", id="auth-token-query-organization"),
    pytest.param("organizationId=org-b", {"token": "tok-alice", "organizationId": "org-a"},
                 None, "org-a", id="auth-organization-wins-over-query"),
    pytest.param("organizationId=org-a", {"token": "tok-alice", "organizationId": "org-b"},
                 None, "forbidden", id="auth-organization-bad-query-organization-good"),
    pytest.param("", {"token": "tok-alice", "organizationId": "org-a"}, "Bearer tok-nobody",
                 "org-a", id="auth-token-good-header-bad"),
    pytest.param("", {"token": "tok-nobody", "organizationId": "org-a"}, "Bearer tok-alice",
                 "token_invalid", id="auth-token-bad-header-good"),
    pytest.param("token=tok-alice&organizationId=org-a", None, "Bearer tok-nobody",
                 "org-a", id="query-token-good-header-bad"),
    pytest.param("token=tok-nobody&organizationId=org-a", None, "Bearer tok-alice",
                 "token_invalid", id="query-token-bad-header-good"),
]


@pytest.mark.parametrize(("query", "auth", "header", "outcome"), PRECEDENCE)
def test_first_found_credential_wins(gunicorn_server: Server, listen: Any,
                                     transports: list[str], query: str, auth: Any,
                                     header: str | None, outcome: str) -> None:
    kwargs: dict[str, Any] = {}
    if auth is not None:
        kwargs["auth"] = auth
    if header is not None:
        kwargs["headers"] = {"Authorization": header}
    url = f"{gunicorn_server.url}?{query}" if query else gunicorn_server.url
    listener = listen(url, transports=transports, **kwargs)
    if outcome.startswith("org-"):
        assert_admitted_to(gunicorn_server, listener, outcome)
    else:
        assert_refused(listener, outcome)


# --- rooms ----------------------------------------------------------------------------


def test_admitted_socket_is_in_organization_and_user_rooms(gunicorn_server: Server,
                                                           listen: Any,
                                                           transports: list[str]) -> None:
    listener = listen(gunicorn_server.url, transports=transports,
                      auth={"token": "tok-alice", "organizationId": "org-a"})
    to_org, to_user, marker = unique("org"), unique("user"), unique("marker")
    assert publish(gunicorn_server, "org-a", "news", {"id": to_org}).status_code == 202
    response = publish_to_user(gunicorn_server, "alice", "notice", {"id": to_user})
    assert response.status_code == 202
    assert response.json()["room"] == "user.alice"
    assert publish_to_user(gunicorn_server, "alice", "marker", marker).status_code == 202
    assert listener.events_before("marker", marker) == [("news", {"id": to_org}),
                                                  ("notice", {"id": to_user})]


NUMERIC_ORG = "734210"


@pytest.fixture(scope="module")
def numeric_organization(postgres: Any) -> str:
    """An organization whose id is all digits, with one member (tok-numeric-connect)."""
    postgres.psql(
        f"INSERT INTO organization_users (organization_id, user_id) "
        f"VALUES ('{NUMERIC_ORG}', 'numeric-connect') ON CONFLICT DO NOTHING;"
        "INSERT INTO oauth_access_tokens (access_token, client_id, user_id, expires) "
        "VALUES ('tok-numeric-connect', 'web', 'numeric-connect', "
        "LOCALTIMESTAMP + INTERVAL '1 day') ON CONFLICT DO NOTHING;")
    return NUMERIC_ORG


def test_integer_organization_id_works_like_the_string(gunicorn_server: Server, listen: Any,
                                                       transports: list[str],
                                                       numeric_organization: str) -> None:
    as_int = listen(gunicorn_server.url, transports=transports,
                    auth={"token": "tok-numeric-connect",
                          "organizationId": int(numeric_organization)})
    as_str = listen(gunicorn_server.url, transports=transports,
                    auth={"token": "tok-numeric-connect", "organizationId": numeric_organization})
    value, marker = unique("numeric"), unique("marker")
    assert publish(gunicorn_server, numeric_organization, "news", {"id": value}).status_code == 202
    assert publish(gunicorn_server, numeric_organization, "marker", marker).status_code == 202
    assert as_int.events_before("marker", marker) == [("news", {"id": value})]
    assert as_str.events_before("marker", marker) == [("news", {"id": value})]


def test_integer_organization_id_of_a_non_member_is_forbidden(
        gunicorn_server: Server, listen: Any, transports: list[str],
        numeric_organization: str) -> None:
    listener = listen(gunicorn_server.url, transports=transports,
                      auth={"token": "tok-alice", "organizationId": int(numeric_organization)})
    assert_refused(listener, "forbidden")


# --- clients cannot publish ---------------------------------------------------------------


@pytest.fixture(scope="module")
def debug_server(postgres: Any, tmp_path_factory: Any) -> Any:
    """A gunicorn logging at debug, so a test can see when client events were handled."""
    server = start_gunicorn(base_env(postgres, ORGCAST_LOG_LEVEL="debug"),
                            tmp_path_factory.mktemp("gunicorn-debug"))
    yield server
    server.stop()


def wait_for_log(server: Server, since: int, patterns: list[str], timeout: float = 5.0) -> None:
    """Wait until each regex appears in the server output written after offset ``since``."""
    deadline = time.monotonic() + timeout
    while True:
        text = server.output()[since:]
        missing = [p for p in patterns if not re.search(p, text)]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"server never logged {missing}:\n{text}")
        time.sleep(0.02)


def test_client_events_are_not_published(debug_server: Server, listen: Any,
                                         transports: list[str]) -> None:
    url = debug_server.url
    sender = listen(url, transports=transports,
                    auth={"token": "tok-alice", "organizationId": "org-a"})
    same_org = listen(url, transports=transports,
                      auth={"token": "tok-bob", "organizationId": "org-a"})
    same_user = listen(url, transports=transports,
                       auth={"token": "tok-alice", "organizationId": "org-a"})
    other_org = listen(url, transports=transports,
                       auth={"token": "tok-carol", "organizationId": "org-b"})
    since = len(debug_server.output())

    sender.client.emit("news", {"forged": True})
    sender.client.emit("news", {"room": "organization.org-b", "forged": True})
    sender.client.emit("subscribe-everything", {"organizationId": "org-b"})
    # The server has handled every one of them (and said it ignored them) ...
    wait_for_log(debug_server, since, [
        r"ignored client event 'news'(.|\n)*ignored client event 'news'",
        r"ignored client event 'subscribe-everything'"])
    # ... before these markers were published, so anything delivered came first.
    marker = unique("marker")
    for organization in ("org-a", "org-b"):
        assert publish(debug_server, organization, "marker", marker).status_code == 202
    for listener in (sender, same_org, same_user, other_org):
        assert listener.events_before("marker", marker) == []

    # The sender is still connected, and still in both of its rooms.
    assert sender.client.connected
    to_user, marker = unique("user"), unique("marker")
    assert publish_to_user(debug_server, "alice", "news", {"id": to_user}).status_code == 202
    assert publish(debug_server, "org-a", "marker", marker).status_code == 202
    assert sender.events_before("marker", marker) == [("news", {"id": to_user})]
    assert same_user.events_before("marker", marker) == [("news", {"id": to_user})]
    assert same_org.events_before("marker", marker) == []
    assert debug_server.alive()

