"""The connect check: who is this token, and may it listen to this organization.

A service: it knows nothing of Socket.IO, HTTP or drivers. Its store, its
failure counter and the waiters it coalesces lookups with come in through
the constructor, and it raises ``Refusal`` with a code of the README's
"Refusal codes".

What keeps a reconnect storm (every client of a restarted worker at once)
from overwhelming Postgres:

- a short cache of accepted answers (``ORGCAST_AUTH_CACHE_TTL``, never past
  the token's ``expires``, dropped when the user is disconnected);
- coalescing: identical lookups in flight (the sockets of one user with one
  token) wait for the first one's answer instead of querying again;
- the pool (``ORGCAST_DB_POOL_SIZE``) as the hard cap on concurrent queries.

Failed authorizations are counted per client address; past the limit the
address is refused ``rate_limited`` before any lookup.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from app.auth.credentials import Credentials, TokenRow, is_plausible_token
from app.errors import Refusal, Unavailable

log = logging.getLogger(__name__)

_CACHE_MAX = 100_000
#: refusals that count as failed authorizations of an address
COUNTED = frozenset({"token_invalid", "token_expired", "forbidden", "token_mismatch"})


class Store(Protocol):
    def lookup(self, token: str, organization_id: str) -> TokenRow | None: ...
    def is_member(self, organization_id: str, user_id: str) -> bool: ...
    def tokens(self, tokens: list[str]) -> dict[str, tuple[str, bool]]: ...
    def members(self, pairs: list[tuple[str, str]]) -> set[tuple[str, str]]: ...


class Limiter(Protocol):
    def limited(self, address: str) -> bool: ...
    def failed(self, address: str) -> None: ...


class Observer(Protocol):
    """Told of every authorization (the metrics implement it)."""

    def authorized(self, result: str, seconds: float, answered_by: str) -> None:
        """``result``: "ok" or the refusal code; ``answered_by``: database, cache, coalesced or limiter."""


class Waiter(Protocol):
    """Where coalesced lookups wait for the first one's answer (a gevent AsyncResult)."""

    def set(self, value: Any) -> None: ...
    def set_exception(self, exc: BaseException) -> None: ...
    def get(self, block: bool = True, timeout: float | None = None) -> Any: ...
    def wait(self, timeout: float | None = None) -> Any: ...
    def ready(self) -> bool: ...


@dataclass(frozen=True)
class Principal:
    """An authorized listener: its user, organization and token deadline."""

    user_id: str
    organization_id: str
    #: wall-clock time (epoch seconds) at which the token expires; None: never
    expires_at: float | None


class _NoLimit:
    def limited(self, address: str) -> bool:
        return False

    def failed(self, address: str) -> None:
        pass


class AuthChecker:
    """Authorize connections, subscriptions and token refreshes."""

    def __init__(self, store: Store, cache_ttl: float, *, limiter: Limiter | None = None,
                 waiter: Callable[[], Waiter] | None = None, wait_timeout: float = 5.0,
                 clock: Callable[[], float] = time.time, observer: Observer | None = None) -> None:
        self._store = store
        self._cache_ttl = cache_ttl
        self._limiter: Limiter = limiter if limiter is not None else _NoLimit()
        self._new_waiter = waiter
        self._wait_timeout = wait_timeout
        self._clock = clock
        self._observer = observer
        self._cache: dict[bytes, tuple[Principal, float]] = {}
        self._inflight: dict[bytes, Waiter] = {}
        self._next_purge = 0.0
        #: lookups asked of the store, and answers taken from the cache or another lookup
        self.lookups = 0
        self.cache_hits = 0
        self.coalesced = 0

    def authorize(self, creds: Credentials, address: str = "", fresh: bool = False) -> Principal:
        """Return the principal for these credentials (``fresh``: ask the database, not the cache).

        :raise Refusal: rate_limited, token_invalid, token_expired, forbidden, unavailable
        """
        if self._observer is None:
            return self._authorize(creds, address, ["database"], fresh)
        started, result, by = time.monotonic(), "unavailable", ["database"]
        try:
            principal = self._authorize(creds, address, by, fresh)
            result = "ok"
            return principal
        except Refusal as exc:
            result = exc.code
            raise
        finally:
            self._observer.authorized(result, time.monotonic() - started, by[0])

    def _authorize(self, creds: Credentials, address: str, by: list[str], fresh: bool = False) -> Principal:
        """``authorize``; ``by[0]`` is set to what answered."""
        if address and self._limiter.limited(address):
            by[0] = "limiter"
            raise Refusal("rate_limited")
        key = _cache_key(creds.organization_id, creds.token)
        now = self._clock()
        cached = None if fresh else self._cache.get(key)
        if cached is not None:
            if now < cached[1]:
                self.cache_hits += 1
                by[0] = "cache"
                return cached[0]
            del self._cache[key]
        pending = None if fresh else self._inflight.get(key)
        if pending is not None:
            self.coalesced += 1
            by[0] = "coalesced"
            # wait() returns at the timeout instead of raising gevent's Timeout, which is
            # no Exception and escaped the connect check (issue 18).
            pending.wait(self._wait_timeout)
            if not pending.ready():
                raise Unavailable("the lookup this one waited for did not answer in time")
            principal: Principal = pending.get(block=False)
            return principal
        waiter = self._new_waiter() if self._new_waiter is not None else None
        if waiter is not None:
            self._inflight[key] = waiter
        try:
            principal = self._check(creds)
        except Refusal as exc:
            if waiter is not None:
                waiter.set_exception(exc)
            if address and exc.code in COUNTED:
                self._limiter.failed(address)
            raise
        finally:
            self._inflight.pop(key, None)
        if waiter is not None:
            waiter.set(principal)
        self._remember(key, principal, self._clock())
        return principal

    def _check(self, creds: Credentials) -> Principal:
        self.lookups += 1
        row = self._store.lookup(creds.token, creds.organization_id)
        now = self._clock()
        if row is None:
            raise Refusal("token_invalid")
        refusal = None
        if not row.active or (row.expires_in is not None and row.expires_in <= 0):
            refusal = Refusal("token_expired")
        elif not row.member:
            refusal = Refusal("forbidden")
        if refusal is not None:
            refusal.user_id = row.user_id
            raise refusal
        expires_at = now + row.expires_in if row.expires_in is not None else None
        return Principal(row.user_id, creds.organization_id, expires_at)

    def check_membership(self, organization_id: str, user_id: str, address: str = "") -> None:
        """Accept ``user_id`` into another organization's room (``subscribe``).

        :raise Refusal: rate_limited, forbidden, unavailable
        """
        if address and self._limiter.limited(address):
            raise Refusal("rate_limited")
        if not self._store.is_member(organization_id, user_id):
            if address:
                self._limiter.failed(address)
            raise Refusal("forbidden")

    def is_member(self, organization_id: str, user_id: str) -> bool:
        """Tell whether the user belongs to the organization (a recovered session's rooms), past the cache.

        :raise Unavailable: the database did not answer in time
        """
        return self._store.is_member(organization_id, user_id)

    def still_members(self, organization_ids: list[str], user_id: str) -> list[str]:
        """The organizations of ``organization_ids`` the user belongs to now (asked of the database).

        :raise Unavailable: the database did not answer in time
        """
        return [o for o in organization_ids if self._store.is_member(o, user_id)]

    def refresh(self, token: str, user_id: str, organization_id: str, address: str = "") -> float | None:
        """Check a newer token of the same user; return its expiry (epoch seconds, None: never).

        :raise Refusal: rate_limited, token_invalid, token_expired, token_mismatch, unavailable
        """
        if address and self._limiter.limited(address):
            raise Refusal("rate_limited")
        try:
            if not is_plausible_token(token):
                raise Refusal("token_invalid")
            cached = self._cache.get(_cache_key(organization_id, token))
            if cached is not None and self._clock() < cached[1] and cached[0].user_id == user_id:
                # Accepted a moment ago: the same answer, without a query (a refresh flood).
                self.cache_hits += 1
                return cached[0].expires_at
            self.lookups += 1
            row = self._store.lookup(token, organization_id)
            if row is None:
                raise Refusal("token_invalid")
            if not row.active or (row.expires_in is not None and row.expires_in <= 0):
                raise Refusal("token_expired")
            if row.user_id != user_id:
                raise Refusal("token_mismatch")
        except Refusal as exc:
            if address and exc.code in COUNTED:
                self._limiter.failed(address)
            raise
        now = self._clock()
        expires_at = now + row.expires_in if row.expires_in is not None else None
        if row.member:
            self._remember(_cache_key(organization_id, token), Principal(user_id, organization_id, expires_at), now)
        return expires_at

    def tokens_now(self, tokens: list[str]) -> dict[str, tuple[str, bool]]:
        """(user_id, active) of each of ``tokens`` that exists, asked of the database now (in one batch).

        :raise Unavailable: the database did not answer in time
        """
        return self._store.tokens(tokens)

    def members_now(self, pairs: list[tuple[str, str]]) -> set[tuple[str, str]]:
        """The (organization, user) pairs that are memberships now (in one batch).

        :raise Unavailable: the database did not answer in time
        """
        return self._store.members(pairs)

    def forget_membership(self, organization_id: str, user_id: str) -> None:
        """Drop cached acceptances of the user into the organization (a revocation)."""
        for key in [k for k, (p, _) in self._cache.items()
                    if p.user_id == user_id and p.organization_id == organization_id]:
            del self._cache[key]

    def forget_user(self, user_id: str) -> None:
        """Drop cached acceptances of a user (it was kicked or logged out)."""
        for key in [k for k, (p, _) in self._cache.items() if p.user_id == user_id]:
            del self._cache[key]

    def _remember(self, key: bytes, principal: Principal, now: float) -> None:
        if self._cache_ttl <= 0:
            return
        until = now + self._cache_ttl
        if principal.expires_at is not None:
            until = min(until, principal.expires_at)
        if now >= self._next_purge or len(self._cache) >= _CACHE_MAX:
            # Expired entries are dropped when met, and here, at most once per TTL.
            self._next_purge = now + self._cache_ttl
            self._cache = {k: v for k, v in self._cache.items() if v[1] > now}
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
        self._cache[key] = (principal, until)

    @property
    def cached(self) -> int:
        """How many acceptances are cached now."""
        return len(self._cache)


def _cache_key(organization_id: str, token: str) -> bytes:
    # Hash, so the cache holds no usable token.
    return hashlib.sha256(f"{organization_id}\0{token}".encode()).digest()
