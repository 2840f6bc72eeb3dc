"""The two configurable lookups (README, "Configuration": ORGCAST_TOKEN_SQL and
ORGCAST_MEMBERSHIP_SQL), against the application's database.

The connect check costs one round trip: the token SQL becomes a CTE and the
membership SQL an ``EXISTS`` over it, its ``%(user_id)s`` bound to the
token's own ``user_id`` column. This rewrites only the operator's configured
SQL, never client input; client values always travel as parameters. When the two
statements do not combine (say, the membership SQL compares the user id with
a column of another type), the store says so once and uses two round trips.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from app.auth.credentials import TokenRow
from app.db import QueryError

log = logging.getLogger(__name__)


class Database(Protocol):
    def fetch_one(self, sql: str, params: dict[str, Any],
                  timeout: float | None = None) -> tuple[Any, ...] | None: ...
    def fetch_all(self, sql: str, params: dict[str, Any],
                  timeout: float | None = None) -> list[tuple[Any, ...]]: ...


class AuthStore:
    """Token and membership lookups through configurable SQL."""

    def __init__(self, db: Database, token_sql: str, membership_sql: str) -> None:
        self._db = db
        self._membership_sql = membership_sql
        self._combined = True
        # The same three columns as the combined query: user_id, active, seconds left.
        self._token_sql = (
            f"WITH orgcast_token AS ({token_sql}) "
            "SELECT t.user_id::text, t.active, "
            "EXTRACT(EPOCH FROM (t.expires::timestamptz - NOW()))::float8 "
            "FROM orgcast_token t LIMIT 1"
        )
        membership_of_token = membership_sql.replace(
            "%(user_id)s", "(SELECT user_id FROM orgcast_token LIMIT 1)")
        # expires is compared in the database, in the session's time zone
        # (ORGCAST_DB_TIMEZONE), so the remaining lifetime is computed there too.
        self._combined_sql = (
            f"WITH orgcast_token AS ({token_sql}) "
            "SELECT t.user_id::text, t.active, "
            "EXTRACT(EPOCH FROM (t.expires::timestamptz - NOW()))::float8, "
            f"EXISTS ({membership_of_token}) "
            "FROM orgcast_token t LIMIT 1"
        )
        # The batch forms of the re-check while connected (README, "Rights re-checked"): the
        # same configured SQL, its parameters bound to each row of an unnest.
        self._batch = self._batch_members = True
        self._tokens_sql = (
            "SELECT q.token, r.user_id::text, r.active FROM unnest(%(tokens)s::text[]) AS q(token) "
            f"LEFT JOIN LATERAL ({token_sql.replace('%(token)s', 'q.token')} LIMIT 1) r ON true"
        )
        self._members_sql = (
            "SELECT q.o, q.u FROM unnest(%(orgs)s::text[], %(users)s::text[]) AS q(o, u) WHERE EXISTS ("
            + membership_sql.replace("%(organization_id)s", "q.o").replace("%(user_id)s", "q.u") + ")"
        )

    def lookup(self, token: str, organization_id: str) -> TokenRow | None:
        """Return the token's row with its membership in the organization, or None.

        :raise Unavailable: the database did not answer in time
        """
        params = {"token": token, "organization_id": organization_id}
        if self._combined:
            try:
                row = self._db.fetch_one(self._combined_sql, params)
            except QueryError as exc:
                log.warning("token and membership SQL do not combine (%s); using two queries", exc.detail)
                self._combined = False
            else:
                if row is None or row[0] is None:
                    return None
                user_id, active, expires_in, member = row
                return TokenRow(str(user_id), bool(active), expires_in, bool(member))
        row = self._db.fetch_one(self._token_sql, params)
        if row is None or row[0] is None:
            return None
        user_id, active, expires_in = row
        return TokenRow(str(user_id), bool(active), expires_in,
                        self.is_member(organization_id, str(user_id)))

    def tokens(self, tokens: list[str]) -> dict[str, tuple[str, bool]]:
        """(user_id, active) of each token that exists, in one round trip (the re-check while connected).

        The configured token SQL runs once per token inside one statement
        (``LATERAL``), its ``%(token)s`` bound to each; if it does not fit
        there, each token is looked up on its own.

        :raise Unavailable: the database did not answer in time
        """
        if not tokens:
            return {}
        if self._batch:
            try:
                rows = self._db.fetch_all(self._tokens_sql, {"tokens": tokens})
                return {str(t): (str(u), bool(a)) for t, u, a in rows if u is not None}
            except QueryError as exc:
                log.warning("the token SQL does not run for many tokens at once (%s); one query each", exc.detail)
                self._batch = False
        found = {}
        for token in tokens:
            row = self._db.fetch_one(self._token_sql, {"token": token, "organization_id": ""})
            if row is not None and row[0] is not None:
                found[token] = (str(row[0]), bool(row[1]))
        return found

    def members(self, pairs: list[tuple[str, str]]) -> set[tuple[str, str]]:
        """The (organization, user) pairs of ``pairs`` that are memberships, in one round trip.

        :raise Unavailable: the database did not answer in time
        """
        if not pairs:
            return set()
        if self._batch_members:
            try:
                rows = self._db.fetch_all(self._members_sql, {"orgs": [o for o, _ in pairs],
                                                              "users": [u for _, u in pairs]})
                return {(str(o), str(u)) for o, u in rows}
            except QueryError as exc:
                log.warning("the membership SQL does not run for many pairs at once (%s); one query each", exc.detail)
                self._batch_members = False
        return {(o, u) for o, u in pairs if self.is_member(o, u)}

    def is_member(self, organization_id: str, user_id: str) -> bool:
        """Tell whether the user belongs to the organization.

        :raise Unavailable: the database did not answer in time
        """
        row = self._db.fetch_one(self._membership_sql,
                                 {"organization_id": organization_id, "user_id": user_id})
        return row is not None
