"""Rights re-checked while connected (contract §4.1, issue 19): the revoke route acts at once on
every worker and instance, the periodic re-check finds what the application changed in its
tables, the socket hears ``revoked`` first and nothing of that organization after it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import requests
from cluster import running
from conftest import API_KEY, Server, base_env, publish, start_gunicorn, unique
from test_lifecycle import new_user

pytestmark = pytest.mark.slow


def revoke(server: Server, organization_id: str, user_id: str, key: str = API_KEY) -> requests.Response:
    return requests.post(f"{server.url}/api/v1/organizations/{organization_id}/users/{user_id}/revoke",
                         headers={"Authorization": f"Bearer {key}"}, timeout=10)


def events_until_marker(listener: Any, marker: str) -> list[tuple[str, Any]]:
    return listener.events_before("marker", marker, timeout=15)


@pytest.mark.parametrize("bus", ["postgres", "redis"])
def test_revoke_acts_on_every_worker_and_instance_at_once(bus: str, postgres: Any, redis_server: Any,
                                                          tmp_path: Path, listen: Any) -> None:
    env = base_env(postgres, ORGCAST_AUTH_CACHE_TTL="60")
    if bus == "redis":
        env["REDIS_URL"] = redis_server.url
    user, token = new_user(postgres, 3600, ("org-a", "org-b"))
    with running(env, tmp_path, [2, 1]) as cluster:
        placed = cluster.spread(listen, {"token": token, "organizationId": "org-a"})
        for listener, _, _ in placed:
            assert listener.client.call("subscribe", {"organizationId": "org-b"}, timeout=10)["ok"] is True
        postgres.psql(f"DELETE FROM organization_users WHERE organization_id = 'org-b' AND user_id = '{user}'")
        reply = revoke(cluster.servers[1], "org-b", user)
        assert reply.status_code == 202, reply.text
        assert reply.json() == {"status": "accepted", "room": "organization.org-b", "userId": user}
        for org in ("org-b", "org-a"):
            assert publish(cluster.servers[0], org, "news", f"after revoke: {org}").status_code == 202
        marker = unique("m")
        assert publish(cluster.servers[0], "org-a", "marker", marker).status_code == 202
        for listener, _, _ in placed:
            seen = events_until_marker(listener, marker)
            assert ("revoked", {"code": "forbidden", "organizationId": "org-b"}) in seen
            assert ("news", "after revoke: org-b") not in seen
            assert ("news", "after revoke: org-a") in seen
            assert listener.client.connected
        # The cached "yes" of org-b is forgotten everywhere: a subscribe is refused at once.
        answer = placed[0][0].client.call("subscribe", {"organizationId": "org-b"}, timeout=10)
        assert answer["ok"] is False and answer["code"] == "forbidden"


def test_revoking_the_last_organization_disconnects(postgres: Any, gunicorn_factory: Any, listen: Any) -> None:
    server = gunicorn_factory(base_env(postgres, ORGCAST_AUTH_CACHE_TTL="60"))
    user, token = new_user(postgres, 3600, ("org-a",))
    listener = listen(server.url, auth={"token": token, "organizationId": "org-a"})
    postgres.psql(f"DELETE FROM organization_users WHERE user_id = '{user}'")
    assert revoke(server, "org-a", user).status_code == 202
    assert listener.wait_for("revoked", timeout=10) == {"code": "forbidden", "organizationId": "org-a"}
    listener.wait_for("disconnect", timeout=10)
    again = listen(server.url, auth={"token": token, "organizationId": "org-a"})
    assert again.refusal_code == "forbidden"  # the cache of 60 s forgot the pair


@pytest.fixture
def rechecking(postgres: Any, tmp_path: Path) -> Any:
    server = start_gunicorn(base_env(postgres, ORGCAST_REVALIDATE_INTERVAL="1", WEB_CONCURRENCY="2"), tmp_path)
    yield server
    server.stop()


def test_a_membership_deleted_is_found_by_the_recheck(rechecking: Server, postgres: Any, listen: Any) -> None:
    user, token = new_user(postgres, 3600, ("org-a", "org-b"))
    listener = listen(rechecking.url, auth={"token": token, "organizationId": "org-a"})
    assert listener.client.call("subscribe", {"organizationId": "org-b"}, timeout=10)["ok"] is True
    postgres.psql(f"DELETE FROM organization_users WHERE organization_id = 'org-b' AND user_id = '{user}'")
    assert listener.wait_for("revoked", timeout=10) == {"code": "forbidden", "organizationId": "org-b"}
    assert publish(rechecking, "org-b", "news", "gone").status_code == 202
    assert publish(rechecking, "org-a", "news", "still").status_code == 202
    marker = unique("m")
    assert publish(rechecking, "org-a", "marker", marker).status_code == 202
    seen = events_until_marker(listener, marker)
    assert ("news", "still") in seen and ("news", "gone") not in seen
    assert listener.client.connected


def test_a_token_deleted_is_found_by_the_recheck(rechecking: Server, postgres: Any, listen: Any) -> None:
    user, token = new_user(postgres, 3600, ("org-a",))
    listener = listen(rechecking.url, auth={"token": token, "organizationId": "org-a"})
    postgres.psql(f"DELETE FROM oauth_access_tokens WHERE access_token = '{token}'")
    assert listener.wait_for("revoked", timeout=10) == {"code": "token_invalid", "organizationId": None}
    listener.wait_for("disconnect", timeout=10)


def test_the_recheck_asks_a_handful_of_queries_for_many_sockets(postgres: Any) -> None:
    """One statement per batch of tokens and per batch of memberships, whatever the sockets."""
    from app.auth.store import AuthStore
    from app.config import DEFAULT_MEMBERSHIP_SQL, DEFAULT_TOKEN_SQL
    from app.db import Database

    db = Database(postgres.dsn, pool_size=1, timeout=5)
    statements = []
    real = db.fetch_all

    def counted(sql: str, params: Any, timeout: Any = None, limit: Any = None) -> Any:
        statements.append(sql)
        return real(sql, params, timeout, limit)

    db.fetch_all = counted  # type: ignore[method-assign]
    store = AuthStore(db, DEFAULT_TOKEN_SQL, DEFAULT_MEMBERSHIP_SQL)
    tokens = ["tok-alice", "tok-bob", "tok-dave", "no-such-token"] * 250
    found = store.tokens(tokens)
    assert found["tok-alice"] == ("alice", True) and "no-such-token" not in found
    members = store.members([("org-a", "alice"), ("org-b", "alice"), ("org-b", "dave")] * 300)
    assert members == {("org-a", "alice"), ("org-b", "dave")}
    assert len(statements) == 2
    db.close()


@pytest.mark.parametrize(("path", "status", "code"), [
    ("organizations/bad id!/users/alice/revoke", 422, "invalid_organization"),
    ("organizations/org-a/users/%20/revoke", 422, "invalid_user"),
])
def test_revoke_refuses_invalid_ids(gunicorn_server: Server, path: str, status: int, code: str) -> None:
    reply = requests.post(f"{gunicorn_server.url}/api/v1/{path}", headers={"Authorization": f"Bearer {API_KEY}"},
                          timeout=5)
    assert reply.status_code == status and reply.json()["error"]["code"] == code


def test_revoke_needs_the_key(gunicorn_server: Server) -> None:
    reply = revoke(gunicorn_server, "org-a", "alice", key="wrong-key-0123456789")
    assert reply.status_code == 401 and reply.headers["WWW-Authenticate"] == "Bearer"


def test_a_bad_interval_stops_start_up(postgres: Any) -> None:
    from app.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match="ORGCAST_REVALIDATE_INTERVAL"):
        load_settings(base_env(postgres, ORGCAST_REVALIDATE_INTERVAL="soon"))
    assert load_settings(base_env(postgres, ORGCAST_REVALIDATE_INTERVAL="0")).revalidate_interval == 0
