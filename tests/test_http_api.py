"""The server API (README, "Publishing over HTTP") and the operator routes
(README, "Operator routes").

Mostly through the in-process Flask test client (fast); the last section
repeats the essentials through a real gunicorn.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests
from conftest import API_KEY, Server, base_env, free_port

from app import __version__, create_app
from app.config import load_settings

AUTH = {"Authorization": f"Bearer {API_KEY}"}
RESERVED = ["connect", "connect_error", "disconnect", "disconnecting", "newListener",
            "removeListener"]
#: every route of the server API, with a body it accepts
API_ROUTES = [
    pytest.param("/api/v1/organizations/org-a/events", id="organization-events"),
    pytest.param("/api/v1/users/alice/events", id="user-events"),
    pytest.param("/api/v1/users/alice/disconnect", id="user-disconnect"),
]
EVENT_ROUTES = [
    pytest.param("/api/v1/organizations/org-a/events", id="organization-events"),
    pytest.param("/api/v1/users/alice/events", id="user-events"),
]


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    """The response is ``status`` with the JSON error body of ``code``; return the body."""
    in_process = hasattr(response, "get_json")  # Flask's test response, else requests'
    text = response.get_data(as_text=True) if in_process else response.text
    assert response.status_code == status, text
    assert response.headers["Content-Type"].startswith("application/json")
    body = json.loads(text)
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code
    message = body["error"]["message"]
    assert isinstance(message, str) and " " in message.strip()
    return dict(body)


def make_client(postgres: Any, **overrides: str) -> Any:
    """A test client of an app built from the test environment plus ``overrides``."""
    from werkzeug.test import Client

    return Client(create_app(load_settings(base_env(postgres, **overrides))))


# --- accepted requests ------------------------------------------------------------------


def test_publish_to_organization_is_accepted_with_its_room(client: Any) -> None:
    response = client.post("/api/v1/organizations/org-a/events", headers=AUTH,
                           json={"event": "news", "data": {"title": "hello"}})
    assert response.status_code == 202
    assert response.get_json() == {"status": "accepted", "room": "organization.org-a"}


def test_publish_to_user_is_accepted_with_its_room(client: Any) -> None:
    response = client.post("/api/v1/users/alice/events", headers=AUTH,
                           json={"event": "news", "data": [1, 2]})
    assert response.status_code == 202
    assert response.get_json() == {"status": "accepted", "room": "user.alice"}


def test_disconnect_user_is_accepted(client: Any) -> None:
    response = client.post("/api/v1/users/alice/disconnect", headers=AUTH)
    assert response.status_code == 202
    assert response.get_json()["status"] == "accepted"


@pytest.mark.parametrize("data", [None, 0, 1.5, "text", True, [], [1, "two"], {"a": {"b": []}}],
                         ids=repr)
def test_publish_accepts_any_json_data(client: Any, data: Any) -> None:
    response = client.post("/api/v1/organizations/org-a/events", headers=AUTH,
                           json={"event": "news", "data": data})
    assert response.status_code == 202


def test_publish_without_data_is_accepted(client: Any) -> None:
    response = client.post("/api/v1/organizations/org-a/events", headers=AUTH,
                           json={"event": "news"})
    assert response.status_code == 202


@pytest.mark.parametrize("event", ["n", "x" * 64, "news:updated", "Ünïcode-é", "a b"], ids=repr)
def test_publish_accepts_printable_event_names_up_to_64(client: Any, event: str) -> None:
    response = client.post("/api/v1/organizations/org-a/events", headers=AUTH,
                           json={"event": event})
    assert response.status_code == 202


@pytest.mark.parametrize("org", ["o", "x" * 64, "Org_1-2", "42"])
def test_publish_accepts_organization_ids_of_1_to_64_allowed_characters(client: Any,
                                                                        org: str) -> None:
    response = client.post(f"/api/v1/organizations/{org}/events", headers=AUTH,
                           json={"event": "news"})
    assert response.status_code == 202
    assert response.get_json()["room"] == f"organization.{org}"


def test_body_is_json_whatever_the_content_type(client: Any) -> None:
    response = client.post("/api/v1/organizations/org-a/events", headers=AUTH,
                           data=json.dumps({"event": "news"}), content_type="text/plain")
    assert response.status_code == 202


def test_any_of_several_api_keys_is_accepted(postgres: Any) -> None:
    second = "second-api-key-abcdefgh"
    client = make_client(postgres, ORGCAST_API_KEYS=f"{API_KEY}, {second}")
    for key in (API_KEY, second):
        response = client.post("/api/v1/organizations/org-a/events",
                               headers={"Authorization": f"Bearer {key}"}, json={"event": "news"})
        assert response.status_code == 202, key


def test_bearer_scheme_is_case_insensitive(client: Any) -> None:
    response = client.post("/api/v1/organizations/org-a/events",
                           headers={"Authorization": f"bearer {API_KEY}"}, json={"event": "news"})
    assert response.status_code == 202


# --- 401 ------------------------------------------------------------------------------------

BAD_AUTHORIZATION = [
    pytest.param(None, id="missing"),
    pytest.param("", id="empty"),
    pytest.param("Bearer wrong-key-0123456789", id="wrong-key"),
    pytest.param(f"Bearer {API_KEY}x", id="key-with-suffix"),
    pytest.param(f"Bearer {API_KEY[:-1]}", id="key-prefix"),
    pytest.param("Bearer ", id="bearer-without-key"),
    pytest.param(f"Basic {API_KEY}", id="basic-scheme"),
    pytest.param(f"Token {API_KEY}", id="token-scheme"),
    pytest.param(API_KEY, id="no-scheme"),
]


@pytest.mark.parametrize("route", API_ROUTES)
@pytest.mark.parametrize("authorization", BAD_AUTHORIZATION)
def test_server_api_without_a_valid_key_is_401_with_www_authenticate(
        client: Any, route: str, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    response = client.post(route, headers=headers, json={"event": "news"})
    assert_error(response, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"] == "Bearer"


def test_401_message_does_not_echo_the_presented_key(client: Any) -> None:
    response = client.post("/api/v1/organizations/org-a/events",
                           headers={"Authorization": "Bearer presented-secret-42"},
                           json={"event": "news"})
    assert response.status_code == 401
    assert "presented-secret-42" not in response.get_data(as_text=True)


def test_key_is_checked_before_the_body_and_the_ids(client: Any) -> None:
    response = client.post("/api/v1/organizations/a%20b/events", data="not json")
    assert_error(response, 401, "unauthorized")


@pytest.fixture
def keyless_client(postgres: Any) -> Any:
    """An app whose environment has no ORGCAST_API_KEYS."""
    env = base_env(postgres)
    del env["ORGCAST_API_KEYS"]
    settings = load_settings(env)
    assert settings.api_keys == ()
    from werkzeug.test import Client

    return Client(create_app(settings))


@pytest.mark.parametrize("route", API_ROUTES)
def test_server_api_is_401_when_no_api_keys_are_configured(keyless_client: Any,
                                                           route: str) -> None:
    response = keyless_client.post(route, headers=AUTH, json={"event": "news"})
    assert_error(response, 401, "api_disabled")
    assert response.headers["WWW-Authenticate"] == "Bearer"


def test_admin_config_is_401_when_no_api_keys_are_configured(keyless_client: Any) -> None:
    response = keyless_client.get("/admin/config", headers=AUTH)
    assert_error(response, 401, "api_disabled")
    assert response.headers["WWW-Authenticate"] == "Bearer"


# --- 400 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", EVENT_ROUTES)
@pytest.mark.parametrize("body", [
    pytest.param(b"", id="empty"),
    pytest.param(b"not json", id="not-json"),
    pytest.param(b'{"event": "news"', id="truncated-json"),
    pytest.param(b"\xff\xfe\x00", id="not-utf8"),
])
def test_body_that_is_not_json_is_400(client: Any, route: str, body: bytes) -> None:
    response = client.post(route, headers=AUTH, data=body, content_type="application/json")
    assert_error(response, 400, "bad_request")


@pytest.mark.parametrize("route", EVENT_ROUTES)
@pytest.mark.parametrize("body", [
    pytest.param([{"event": "news"}], id="array"),
    pytest.param("news", id="string"),
    pytest.param(42, id="number"),
    pytest.param(None, id="null"),
])
def test_body_that_is_not_a_json_object_is_400(client: Any, route: str, body: Any) -> None:
    response = client.post(route, headers=AUTH, data=json.dumps(body),
                           content_type="application/json")
    assert_error(response, 400, "bad_request")


@pytest.mark.parametrize("route", EVENT_ROUTES)
@pytest.mark.parametrize("body", [{}, {"data": {"x": 1}}, {"name": "news"}], ids=repr)
def test_body_without_event_is_400(client: Any, route: str, body: Any) -> None:
    response = client.post(route, headers=AUTH, json=body)
    assert_error(response, 400, "bad_request")


# --- 413 ------------------------------------------------------------------------------------


def test_body_over_max_payload_is_413(postgres: Any) -> None:
    client = make_client(postgres, ORGCAST_MAX_PAYLOAD="256")
    body = json.dumps({"event": "news", "data": "x" * 300})
    response = client.post("/api/v1/organizations/org-a/events", headers=AUTH, data=body,
                           content_type="application/json")
    assert_error(response, 413, "payload_too_large")


def test_body_at_max_payload_is_accepted(postgres: Any) -> None:
    client = make_client(postgres, ORGCAST_MAX_PAYLOAD="256")
    prefix = '{"event": "news", "data": "'
    body = prefix + "x" * (256 - len(prefix) - 2) + '"}'
    assert len(body) == 256
    response = client.post("/api/v1/organizations/org-a/events", headers=AUTH, data=body,
                           content_type="application/json")
    assert response.status_code == 202


def test_default_max_payload_is_one_mebibyte(client: Any) -> None:
    prefix = '{"event": "news", "data": "'
    body = prefix + "x" * (1024 * 1024 - len(prefix) - 1) + '"}'
    assert len(body) == 1024 * 1024 + 1
    response = client.post("/api/v1/organizations/org-a/events", headers=AUTH, data=body,
                           content_type="application/json")
    assert_error(response, 413, "payload_too_large")


# --- 422 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("org", [
    pytest.param("a%20b", id="space"),
    pytest.param("x" * 65, id="65-chars"),
    pytest.param("%C3%A9", id="non-ascii"),
    pytest.param("org.a", id="dot"),
    pytest.param("a:b", id="colon"),
    pytest.param("a%00b", id="nul"),
])
def test_invalid_organization_id_is_422(client: Any, org: str) -> None:
    response = client.post(f"/api/v1/organizations/{org}/events", headers=AUTH,
                           json={"event": "news"})
    assert_error(response, 422, "invalid_organization")


@pytest.mark.parametrize("user", [
    pytest.param("a%20b", id="space"),
    pytest.param("u" * 81, id="81-chars"),
    pytest.param("a%01b", id="control-character"),
    pytest.param("a%09b", id="tab"),
])
@pytest.mark.parametrize("action", ["events", "disconnect"])
def test_invalid_user_id_is_422(client: Any, user: str, action: str) -> None:
    response = client.post(f"/api/v1/users/{user}/{action}", headers=AUTH,
                           json={"event": "news"})
    assert_error(response, 422, "invalid_user")


def test_user_id_of_80_printable_characters_is_accepted(client: Any) -> None:
    user = "u" * 79 + "é"
    response = client.post(f"/api/v1/users/{user}/events", headers=AUTH, json={"event": "news"})
    assert response.status_code == 202
    assert response.get_json()["room"] == f"user.{user}"


@pytest.mark.parametrize("route", EVENT_ROUTES)
@pytest.mark.parametrize("event", RESERVED)
def test_reserved_event_name_is_422(client: Any, route: str, event: str) -> None:
    response = client.post(route, headers=AUTH, json={"event": event, "data": {}})
    assert_error(response, 422, "invalid_event")


@pytest.mark.parametrize("route", EVENT_ROUTES)
@pytest.mark.parametrize("event", [
    pytest.param("", id="empty"),
    pytest.param("x" * 65, id="65-chars"),
    pytest.param("ne\nws", id="newline"),
    pytest.param("news\x00", id="nul"),
    pytest.param("\x1b[31mnews", id="escape"),
    pytest.param("news\x7f", id="del"),
])
def test_event_name_not_1_to_64_printable_characters_is_422(client: Any, route: str,
                                                            event: str) -> None:
    response = client.post(route, headers=AUTH, json={"event": event})
    assert_error(response, 422, "invalid_event")


@pytest.mark.parametrize("route", EVENT_ROUTES)
@pytest.mark.parametrize("event", [None, 1, True, ["news"], {"name": "news"}], ids=repr)
def test_event_name_not_a_string_is_422(client: Any, route: str, event: Any) -> None:
    response = client.post(route, headers=AUTH, json={"event": event})
    assert_error(response, 422, "invalid_event")


# --- 404 / 405 ----------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/nope"),
    ("POST", "/api/v1/organizations/org-a"),
    ("POST", "/api/v1/organizations/org-a/events/extra"),
    ("POST", "/api/v2/organizations/org-a/events"),
    ("GET", "/admin/nope"),
])
def test_unknown_route_is_404_json(client: Any, method: str, path: str) -> None:
    response = client.open(path, method=method, headers=AUTH, json={"event": "news"})
    assert_error(response, 404, "not_found")


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("GET", "/api/v1/organizations/org-a/events", "POST"),
    ("PUT", "/api/v1/users/alice/events", "POST"),
    ("DELETE", "/api/v1/users/alice/disconnect", "POST"),
    ("POST", "/healthz", "GET"),
    ("POST", "/config", "GET"),
    ("DELETE", "/admin/config", "GET"),
])
def test_wrong_method_is_405_json_with_allow(client: Any, method: str, path: str,
                                             allowed: str) -> None:
    response = client.open(path, method=method, headers=AUTH)
    assert_error(response, 405, "method_not_allowed")
    assert allowed in response.headers["Allow"]


# --- operator routes ----------------------------------------------------------------------


def test_healthz_is_ok(client: Any) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


def test_readyz_checks_redis_when_configured(postgres: Any, redis_server: Any) -> None:
    """With REDIS_URL set, /readyz reports Redis too; a Redis that does not
    answer makes it 503 naming that check, while the database stays ok."""
    ready = make_client(postgres, REDIS_URL=redis_server.url).get("/readyz")
    assert ready.status_code == 200
    assert ready.get_json()["checks"]["redis"]["ok"] is True
    assert "latency_ms" in ready.get_json()["checks"]["redis"]

    down = make_client(postgres, REDIS_URL=f"redis://127.0.0.1:{free_port()}/0").get("/readyz")
    assert down.status_code == 503
    body = down.get_json()
    assert body["status"] == "unavailable"
    assert body["checks"]["redis"]["ok"] is False and body["checks"]["redis"]["error"]
    assert body["checks"]["database"]["ok"] is True


def test_readyz_reports_the_database_ready_with_its_latency(client: Any) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "ok"
    database = body["checks"]["database"]
    assert database["ok"] is True
    latency = database["latency_ms"]
    assert isinstance(latency, int | float) and not isinstance(latency, bool)
    assert 0 <= latency < 5000


def test_config_describes_how_to_connect(client: Any) -> None:
    response = client.get("/config")
    assert response.status_code == 200
    body = response.get_json()
    assert body["version"] == __version__
    assert body["socketio"]["path"] == "/socket.io/"
    assert sorted(body["socketio"]["transports"]) == ["polling", "websocket"]
    assert {"token", "organizationId"} <= set(body["auth"]["fields"])
    assert body["rooms"] == {"organization": "organization.<organizationId>",
                             "user": "user.<user_id>"}


def test_config_transports_follow_the_settings(postgres: Any) -> None:
    client = make_client(postgres, ORGCAST_TRANSPORTS="websocket")
    assert client.get("/config").get_json()["socketio"]["transports"] == ["websocket"]
    client = make_client(postgres, WEB_CONCURRENCY="4")
    assert client.get("/config").get_json()["socketio"]["transports"] == ["websocket"]


def test_config_holds_no_secrets(client: Any, postgres: Any) -> None:
    text = client.get("/config").get_data(as_text=True)
    assert API_KEY not in text
    assert postgres.dsn not in text
    assert "DATABASE_URL" not in text
    assert "postgresql://" not in text
    assert "ORGCAST_API_KEYS" not in text


def test_admin_config_needs_the_api_key(client: Any) -> None:
    response = client.get("/admin/config")
    assert_error(response, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"] == "Bearer"
    response = client.get("/admin/config", headers={"Authorization": "Bearer wrong-key-0123456789"})
    assert_error(response, 401, "unauthorized")


def test_admin_config_shows_effective_settings(postgres: Any) -> None:
    client = make_client(postgres, ORGCAST_MAX_PAYLOAD="4096", ORGCAST_AUTH_CACHE_TTL="3")
    response = client.get("/admin/config", headers=AUTH)
    assert response.status_code == 200
    body = response.get_json()
    assert body["version"] == __version__
    settings = body["settings"]
    assert settings["ORGCAST_MAX_PAYLOAD"] == 4096
    assert settings["ORGCAST_AUTH_CACHE_TTL"] == 3
    assert settings["ORGCAST_API_KEYS"] == ["**********"]


def test_admin_config_redacts_keys_and_passwords(postgres: Any) -> None:
    second_key = "another-secret-key-xyz"
    db_password = "db-pass-s3cr3t"
    redis_password = "redis-pass-s3cr3t"
    env = base_env(postgres, ORGCAST_API_KEYS=f"{API_KEY},{second_key}",
                   DATABASE_URL=f"postgresql://orgcast:{db_password}@127.0.0.1:5432/orgcast",
                   REDIS_URL=f"redis://:{redis_password}@127.0.0.1:6379/0")
    client = create_app(load_settings(env)).flask_app.test_client()
    response = client.get("/admin/config", headers=AUTH)
    assert response.status_code == 200
    text = response.get_data(as_text=True)
    for secret in (API_KEY, second_key, db_password, redis_password):
        assert secret not in text
    settings = response.get_json()["settings"]
    assert len(settings["ORGCAST_API_KEYS"]) == 2
    assert "127.0.0.1:5432" in settings["DATABASE_URL"]  # where it points is still shown


# --- through the real gunicorn ------------------------------------------------------------

SMALL_PAYLOAD = 2048


@pytest.fixture(scope="module")
def small_server(postgres: Any, tmp_path_factory: Any) -> Any:
    """A gunicorn whose ORGCAST_MAX_PAYLOAD is small, so an oversized body is cheap to send."""
    from conftest import start_gunicorn

    server = start_gunicorn(base_env(postgres, ORGCAST_MAX_PAYLOAD=str(SMALL_PAYLOAD)),
                            tmp_path_factory.mktemp("gunicorn-small"))
    yield server
    server.stop()


def test_gunicorn_publish_is_accepted(small_server: Server) -> None:
    response = requests.post(f"{small_server.url}/api/v1/organizations/org-a/events",
                             headers=AUTH, json={"event": "news", "data": {"x": 1}}, timeout=5)
    assert response.status_code == 202
    assert response.json() == {"status": "accepted", "room": "organization.org-a"}


def test_gunicorn_errors_are_json(small_server: Server) -> None:
    url = small_server.url
    response = requests.post(f"{url}/api/v1/organizations/org-a/events",
                             json={"event": "news"}, timeout=5)
    assert_error(response, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert_error(requests.post(f"{url}/api/v1/organizations/org-a/events", headers=AUTH,
                               data="nope", timeout=5), 400, "bad_request")
    assert_error(requests.post(f"{url}/api/v1/users/a%20b/events", headers=AUTH,
                               json={"event": "news"}, timeout=5), 422, "invalid_user")
    assert_error(requests.get(f"{url}/nope", timeout=5), 404, "not_found")
    assert_error(requests.get(f"{url}/api/v1/users/alice/events", timeout=5), 405,
                 "method_not_allowed")


def test_gunicorn_operator_routes(small_server: Server) -> None:
    url = small_server.url
    health = requests.get(f"{url}/healthz", timeout=5)
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    ready = requests.get(f"{url}/readyz", timeout=5)
    assert ready.status_code == 200
    assert ready.json()["checks"]["database"]["ok"] is True
    config = requests.get(f"{url}/config", timeout=5)
    assert config.status_code == 200 and API_KEY not in config.text
    admin = requests.get(f"{url}/admin/config", headers=AUTH, timeout=5)
    assert admin.status_code == 200 and API_KEY not in admin.text


def test_gunicorn_oversized_body_is_413_json_and_the_server_stays_up(
        small_server: Server) -> None:
    url = f"{small_server.url}/api/v1/organizations/org-a/events"
    body = json.dumps({"event": "news", "data": "x" * (SMALL_PAYLOAD * 4)})
    response = requests.post(url, headers={**AUTH, "Content-Type": "application/json"},
                             data=body, timeout=5)
    assert_error(response, 413, "payload_too_large")
    assert small_server.alive()
    assert requests.get(f"{small_server.url}/healthz", timeout=5).status_code == 200
    response = requests.post(url, headers=AUTH, json={"event": "news"}, timeout=5)
    assert response.status_code == 202


def test_gunicorn_oversized_chunked_body_is_413_json(small_server: Server) -> None:
    url = f"{small_server.url}/api/v1/organizations/org-a/events"

    def chunks() -> Any:  # no Content-Length: the limit must hold while reading
        yield b'{"event": "news", "data": "'
        for _ in range(4):
            yield b"x" * SMALL_PAYLOAD
        yield b'"}'

    response = requests.post(url, headers={**AUTH, "Content-Type": "application/json"},
                             data=chunks(), timeout=5)
    assert_error(response, 413, "payload_too_large")
    assert requests.get(f"{small_server.url}/healthz", timeout=5).status_code == 200


def exactly(size: int) -> bytes:
    """A valid publish body of exactly ``size`` bytes."""
    prefix = b'{"event": "news", "data": "'
    return prefix + b"x" * (size - len(prefix) - 2) + b'"}'


def test_gunicorn_chunked_body_at_the_limit_is_accepted(small_server: Server) -> None:
    body = exactly(SMALL_PAYLOAD)
    response = requests.post(f"{small_server.url}/api/v1/organizations/org-a/events",
                             headers={**AUTH, "Content-Type": "application/json"},
                             data=iter([body[:100], body[100:]]), timeout=5)
    assert response.status_code == 202, response.text


def test_gunicorn_chunked_body_valid_up_to_the_limit_then_longer_is_413(
        small_server: Server) -> None:
    # Cut at the limit, this body is valid JSON: it must still be refused whole.
    body = exactly(SMALL_PAYLOAD) + b" " * 16
    response = requests.post(f"{small_server.url}/api/v1/organizations/org-a/events",
                             headers={**AUTH, "Content-Type": "application/json"},
                             data=iter([body[:100], body[100:]]), timeout=5)
    assert_error(response, 413, "payload_too_large")


# --- Engine.IO's own refusals are JSON too ---------------------------------------


@pytest.mark.parametrize(
    ("method", "query", "headers", "status", "code"),
    [
        ("GET", "EIO=4&transport=carrier-pigeon", {}, 400, "bad_request"),
        ("GET", "EIO=4&transport=polling&sid=no-such-session", {}, 400, "bad_request"),
        ("POST", "EIO=4&transport=polling&sid=no-such-session", {}, 400, "bad_request"),
        ("GET", "EIO=3&transport=polling", {}, 400, "bad_request"),
        ("GET", "EIO=4&transport=polling", {"Origin": "https://evil.example"}, 403, "origin_not_allowed"),
        # The Engine.IO protocol suite wants 400 here, as Node's server answers.
        ("PUT", "EIO=4&transport=polling", {}, 400, "bad_request"),
        ("GET", "EIO=4", {}, 400, "bad_request"),
    ],
)
def test_engineio_errors_are_json(app: Any, method: str, query: str, headers: dict[str, str],
                                  status: int, code: str) -> None:
    """Every HTTP error is JSON, those python-engineio writes itself included
    (it answers them in text/plain): same shape, engineio's message kept."""
    from werkzeug.test import Client

    response = Client(app).open(f"/socket.io/?{query}", method=method, headers=headers)
    assert response.status_code == status
    assert response.headers["Content-Type"] == "application/json"
    body = response.get_json()
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


@pytest.mark.parametrize(
    ("setting", "origin", "allowed"),
    [
        ("https://app.example", "https://app.example", "https://app.example"),
        ("https://app.example", "https://evil.example", None),
        ("*", "https://anyone.example", "*"),
        ("", "https://app.example", None),
    ],
)
def test_config_is_readable_by_configured_browser_origins(postgres: Any, setting: str, origin: str,
                                                          allowed: str | None) -> None:
    client = make_client(postgres, ORGCAST_CORS_ORIGINS=setting)
    response = client.get("/config", headers={"Origin": origin})
    assert response.status_code == 200
    assert response.headers.get("Access-Control-Allow-Origin") == allowed
    api = client.post("/api/v1/organizations/org-a/events", json={"event": "news"},
                      headers={"Origin": origin, "Authorization": f"Bearer {API_KEY}"})
    assert "Access-Control-Allow-Origin" not in api.headers


# --- the batch route: POST /api/v1/events -------------------------------------------------


def test_batch_is_accepted_with_its_count(client: Any) -> None:
    response = client.post("/api/v1/events", headers=AUTH, json={"events": [
        {"organizationId": "org-a", "event": "news", "data": {"n": 1}},
        {"userId": "alice", "event": "news"},
        {"organizationId": "org-b", "event": "news", "data": None},
    ]})
    assert response.status_code == 202, response.get_data(as_text=True)
    assert response.get_json() == {"status": "accepted", "count": 3}


@pytest.mark.parametrize(("events", "status", "code", "index"), [
    ([{"organizationId": "bad id", "event": "news"}], 422, "invalid_organization", 0),
    ([{"organizationId": "org-a", "event": "news"}, {"userId": "a b", "event": "news"}], 422, "invalid_user", 1),
    ([{"organizationId": "org-a", "event": "news"}, {"organizationId": "org-a", "event": "connect"}],
     422, "invalid_event", 1),
    ([{"organizationId": "org-a", "userId": "alice", "event": "news"}], 400, "bad_request", 0),
    ([{"event": "news"}], 400, "bad_request", 0),
    ([{"organizationId": 42, "event": "news"}], 400, "bad_request", 0),
    ([{"organizationId": "org-a"}], 400, "bad_request", 0),
    (["news"], 400, "bad_request", 0),
])
def test_batch_with_one_bad_event_is_refused_whole_naming_it(client: Any, events: list[Any], status: int,
                                                            code: str, index: int) -> None:
    response = client.post("/api/v1/events", headers=AUTH, json={"events": events})
    body = assert_error(response, status, code)
    assert f"events[{index}]" in body["error"]["message"]


@pytest.mark.parametrize("body", [{}, {"events": []}, {"events": {}}, [1], {"events": "x"}])
def test_batch_body_without_events_is_400(client: Any, body: Any) -> None:
    assert_error(client.post("/api/v1/events", headers=AUTH, json=body), 400, "bad_request")


def test_batch_at_the_size_limit_is_accepted(client: Any) -> None:
    events = [{"organizationId": "org-a", "event": "news"}] * 1000
    response = client.post("/api/v1/events", headers=AUTH, json={"events": events})
    assert response.status_code == 202 and response.get_json()["count"] == 1000


def test_batch_over_the_size_limit_is_400(client: Any) -> None:
    events = [{"organizationId": "org-a", "event": "news"}] * 1001
    assert_error(client.post("/api/v1/events", headers=AUTH, json={"events": events}), 400, "bad_request")


def test_batch_needs_the_api_key(client: Any) -> None:
    response = client.post("/api/v1/events", json={"events": [{"organizationId": "org-a", "event": "news"}]})
    assert_error(response, 401, "unauthorized")


def test_gunicorn_batch_delivers_every_event_in_order_and_nothing_when_refused(
        small_server: Server, listen: Any) -> None:
    alice = listen(small_server.url, auth={"token": "tok-alice", "organizationId": "org-a"})
    carol = listen(small_server.url, auth={"token": "tok-carol", "organizationId": "org-b"})
    refused = requests.post(f"{small_server.url}/api/v1/events", headers=AUTH, timeout=5, json={"events": [
        {"organizationId": "org-a", "event": "news", "data": "never"},
        {"organizationId": "org-a", "event": "disconnect"}]})
    assert refused.status_code == 422
    accepted = requests.post(f"{small_server.url}/api/v1/events", headers=AUTH, timeout=5, json={"events": [
        {"organizationId": "org-a", "event": "news", "data": 1},
        {"userId": "alice", "event": "news", "data": 2},
        {"organizationId": "org-b", "event": "news", "data": 3},
        {"organizationId": "org-a", "event": "marker", "data": "end"},
        {"organizationId": "org-b", "event": "marker", "data": "end"}]})
    assert accepted.status_code == 202 and accepted.json()["count"] == 5
    assert alice.events_before("marker", "end") == [("news", 1), ("news", 2)]
    assert carol.events_before("marker", "end") == [("news", 3)]
