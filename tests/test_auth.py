"""The connect check below the Socket.IO layer: credentials, the SQL lookups
against the real Postgres, the checker's decisions and cache, the pool."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from app.auth.checker import AuthChecker
from app.auth.credentials import Credentials, TokenRow, extract
from app.auth.store import AuthStore
from app.config import DEFAULT_MEMBERSHIP_SQL, DEFAULT_TOKEN_SQL
from app.db import Database
from app.errors import Refusal, Unavailable


def env(query: str = "", authorization: str = "") -> dict[str, str]:
    return {"QUERY_STRING": query, "HTTP_AUTHORIZATION": authorization}


# --- credentials: where they come from, first found wins -----------------------


@pytest.mark.parametrize(
    ("auth", "environ", "expected"),
    [
        ({"token": "a", "organizationId": "o1"}, env("token=q&organizationId=o2", "Bearer h"), ("a", "o1")),
        (None, env("token=q&organizationId=o2", "Bearer h"), ("q", "o2")),
        ({}, env("organizationId=o2", "Bearer h"), ("h", "o2")),
        ({"organizationId": "o1"}, env("", "bearer  h2 "), ("h2", "o1")),
        ({"organizationId": 42, "token": "a"}, env(), ("a", "42")),
        ({"organizationId": "o", "token": 12345}, env(), ("12345", "o")),
        ({"token": "", "organizationId": "o1"}, env("token=q"), ("q", "o1")),
        ("not a dict", env("token=q&organizationId=o2"), ("q", "o2")),
    ],
)
def test_credentials_first_found_wins(auth: Any, environ: dict[str, str], expected: tuple[str, str]) -> None:
    creds = extract(auth, environ)
    assert (creds.token, creds.organization_id) == expected


@pytest.mark.parametrize(
    ("auth", "environ", "code"),
    [
        (None, env(), "token_missing"),
        ({"organizationId": "o"}, env("", "Basic dXNlcjpwYXNz"), "token_missing"),
        ({"token": ["t"], "organizationId": "o"}, env("token=q"), "token_invalid"),
        ({"token": {"t": 1}}, env("token=q"), "organization_missing"),
        ({"token": "t", "organizationId": ["o"]}, env("organizationId=o"), "organization_invalid"),
        ({"token": "t"}, env(), "organization_missing"),
        ({"token": "t", "organizationId": ""}, env(), "organization_missing"),
        ({"token": "t", "organizationId": "a b"}, env(), "organization_invalid"),
        ({"token": "t", "organizationId": "x" * 65}, env(), "organization_invalid"),
        ({"token": "t", "organizationId": ["o"]}, env(), "organization_invalid"),
        ({"token": "t", "organizationId": True}, env(), "organization_invalid"),
        ({"token": "t"}, env("organizationId=..%2Fetc"), "organization_invalid"),
        ({"token": "t" * 5000, "organizationId": "o"}, env(), "token_invalid"),
    ],
)
def test_credentials_refusals(auth: Any, environ: dict[str, str], code: str) -> None:
    with pytest.raises(Refusal) as info:
        extract(auth, environ)
    assert info.value.code == code


def test_credentials_repr_hides_token() -> None:
    assert "s3cret" not in repr(Credentials("s3cret", "o"))


# --- the checker's decisions and cache (a stub store: pure logic) ----------------


class CountingStore:
    def __init__(self, row: TokenRow | None) -> None:
        self.row = row
        self.lookups = 0

    def lookup(self, token: str, organization_id: str) -> TokenRow | None:
        self.lookups += 1
        return self.row

    def is_member(self, organization_id: str, user_id: str) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("row", "code"),
    [
        (None, "token_invalid"),
        (TokenRow("u", active=False, expires_in=-5.0, member=True), "token_expired"),
        (TokenRow("u", active=False, expires_in=-5.0, member=False), "token_expired"),
        (TokenRow("u", active=True, expires_in=100.0, member=False), "forbidden"),
    ],
)
def test_checker_refuses_in_the_documented_order(row: TokenRow | None, code: str) -> None:
    checker = AuthChecker(CountingStore(row), cache_ttl=10)
    with pytest.raises(Refusal) as info:
        checker.authorize(Credentials("t", "o"))
    assert info.value.code == code


def test_checker_caches_acceptance_but_never_past_expiry() -> None:
    clock = Clock()
    store = CountingStore(TokenRow("u", active=True, expires_in=5.0, member=True))
    checker = AuthChecker(store, cache_ttl=60, clock=clock)
    principal = checker.authorize(Credentials("t", "o"))
    assert principal.user_id == "u" and principal.expires_at == 1005.0
    clock.now += 4
    checker.authorize(Credentials("t", "o"))
    assert store.lookups == 1, "second connect within the TTL is served from the cache"
    clock.now += 2  # past the token's expiry, inside the cache TTL
    store.row = TokenRow("u", active=False, expires_in=-1.0, member=True)
    with pytest.raises(Refusal) as info:
        checker.authorize(Credentials("t", "o"))
    assert info.value.code == "token_expired" and store.lookups == 2


def test_checker_cache_is_per_organization_and_refusals_are_not_cached() -> None:
    store = CountingStore(TokenRow("u", active=True, expires_in=None, member=True))
    checker = AuthChecker(store, cache_ttl=60)
    checker.authorize(Credentials("t", "o1"))
    checker.authorize(Credentials("t", "o2"))
    assert store.lookups == 2
    store.row = None
    for _ in range(2):
        with pytest.raises(Refusal):
            checker.authorize(Credentials("bad", "o1"))
    assert store.lookups == 4


def test_checker_forget_user_drops_cached_acceptances() -> None:
    store = CountingStore(TokenRow("u", active=True, expires_in=None, member=True))
    checker = AuthChecker(store, cache_ttl=60)
    checker.authorize(Credentials("t", "o"))
    checker.forget_user("u")
    checker.authorize(Credentials("t", "o"))
    assert store.lookups == 2


def test_checker_with_ttl_zero_always_asks() -> None:
    store = CountingStore(TokenRow("u", active=True, expires_in=None, member=True))
    checker = AuthChecker(store, cache_ttl=0)
    for _ in range(3):
        checker.authorize(Credentials("t", "o"))
    assert store.lookups == 3


# --- the SQL lookups against the real Postgres -----------------------------------


@pytest.fixture
def db(postgres: Any) -> Any:
    database = Database(postgres.dsn, pool_size=2, timeout=2.0)
    yield database
    database.close()


def test_lookup_is_one_round_trip_with_membership(db: Database) -> None:
    store = AuthStore(db, DEFAULT_TOKEN_SQL, DEFAULT_MEMBERSHIP_SQL)
    row = store.lookup("tok-alice", "org-a")
    assert row is not None and row.user_id == "alice" and row.active and row.member
    assert row.expires_in is not None and 86000 < row.expires_in <= 86400
    other = store.lookup("tok-alice", "org-b")
    assert other is not None and not other.member
    expired = store.lookup("tok-expired", "org-a")
    assert expired is not None and not expired.active and expired.expires_in is not None
    assert expired.expires_in < 0
    assert store.lookup("no-such-token", "org-a") is None
    assert store.is_member("org-b", "carol") and not store.is_member("org-b", "alice")


def test_lookup_parameters_are_never_sql(db: Database) -> None:
    store = AuthStore(db, DEFAULT_TOKEN_SQL, DEFAULT_MEMBERSHIP_SQL)
    assert store.lookup("x' OR '1'='1", "org-a") is None
    assert store.lookup("tok-alice", "org-a' OR '1'='1") is not None
    assert not store.lookup("tok-alice", "org-a' OR '1'='1").member  # type: ignore[union-attr]


def test_custom_sql_for_other_table_names(postgres: Any, db: Database) -> None:
    suffix = uuid.uuid4().hex[:8]
    postgres.psql(
        f"CREATE TABLE tokens_{suffix} (tok text PRIMARY KEY, uid int, valid_until timestamp);"
        f"CREATE TABLE members_{suffix} (org text, uid int);"
        f"INSERT INTO tokens_{suffix} VALUES ('k1', 7, LOCALTIMESTAMP + interval '1 hour');"
        f"INSERT INTO members_{suffix} VALUES ('team', 7);")
    store = AuthStore(
        db,
        f"SELECT uid AS user_id, valid_until > NOW() AS active, valid_until AS expires "
        f"FROM tokens_{suffix} WHERE tok = %(token)s",
        f"SELECT 1 FROM members_{suffix} WHERE org = %(organization_id)s AND uid::text = %(user_id)s")
    row = store.lookup("k1", "team")
    assert row is not None and row.user_id == "7" and row.active and row.member
    assert store.is_member("team", "7") and not store.is_member("team", "8")


def test_expires_is_compared_in_the_configured_time_zone(postgres: Any) -> None:
    """A token written in UTC, 30 minutes ahead, is valid for a UTC session;
    a session 3 hours east of UTC reads the same wall-clock value as past."""
    token = "tz-" + uuid.uuid4().hex[:20]
    postgres.psql(
        "INSERT INTO oauth_access_tokens (access_token, client_id, user_id, expires) VALUES "
        f"('{token}', 'web', 'alice', (NOW() AT TIME ZONE 'UTC') + interval '30 minutes')")
    verdicts = {}
    for zone in ("UTC", "Etc/GMT-3"):
        database = Database(postgres.dsn, pool_size=1, timeout=2.0, timezone=zone)
        try:
            row = AuthStore(database, DEFAULT_TOKEN_SQL, DEFAULT_MEMBERSHIP_SQL).lookup(token, "org-a")
        finally:
            database.close()
        assert row is not None
        verdicts[zone] = row.active
    assert verdicts == {"UTC": True, "Etc/GMT-3": False}


# --- the pool: bounded waits, broken connections thrown away ----------------------


def test_pool_exhausted_waits_then_is_unavailable(postgres: Any) -> None:
    import gevent

    database = Database(postgres.dsn, pool_size=1, timeout=0.5)
    try:
        holder = gevent.spawn(database.fetch_one, "SELECT pg_sleep(0.4)", {}, 2.0)
        deadline = time.monotonic() + 2
        while not database._slots.locked():  # the holder has the pool's one connection
            assert time.monotonic() < deadline
            gevent.sleep(0.001)
        started = time.monotonic()
        with pytest.raises(Unavailable):
            database.fetch_one("SELECT 1", {}, 0.2)
        assert time.monotonic() - started < 1.0
        holder.join(5)
        assert holder.successful()
        assert database.fetch_one("SELECT 1", {}) == (1,)
    finally:
        database.close()


def test_query_over_the_timeout_is_unavailable_and_the_pool_recovers(postgres: Any) -> None:
    database = Database(postgres.dsn, pool_size=1, timeout=0.5)
    try:
        started = time.monotonic()
        with pytest.raises(Unavailable):
            database.fetch_one("SELECT pg_sleep(3)", {})
        assert time.monotonic() - started < 1.5
        assert database.fetch_one("SELECT 2", {}) == (2,)
    finally:
        database.close()


def test_sql_error_is_unavailable_without_parameters_in_the_message(postgres: Any, caplog: Any) -> None:
    database = Database(postgres.dsn, pool_size=1, timeout=1.0)
    try:
        with pytest.raises(Unavailable) as info:
            database.fetch_one("SELECT * FROM no_such_table WHERE x = %(token)s", {"token": "tok-s3cret"})
        assert "tok-s3cret" not in str(info.value)
        assert "tok-s3cret" not in caplog.text
        assert database.fetch_one("SELECT 3", {}) == (3,)
    finally:
        database.close()
