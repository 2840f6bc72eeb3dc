"""The connect check: who is this token, and may it listen to this organization.

A service: it knows nothing of Socket.IO, HTTP or psycopg2. Its store comes
in through the constructor, and it raises ``Refusal`` with a code of the README's "Refusal codes".
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from app.auth.credentials import Credentials, TokenRow
from app.errors import Refusal

log = logging.getLogger(__name__)

_CACHE_MAX = 100_000


class Store(Protocol):
    def lookup(self, token: str, organization_id: str) -> TokenRow | None: ...
    def is_member(self, organization_id: str, user_id: str) -> bool: ...


@dataclass(frozen=True)
class Principal:
    """An authorized listener: its user, organization and token deadline."""

    user_id: str
    organization_id: str
    #: wall-clock time (epoch seconds) at which the token expires; None: never
    expires_at: float | None


class AuthChecker:
    """Authorize connections, with a short cache of accepted credentials."""

    def __init__(self, store: Store, cache_ttl: float,
                 clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._cache_ttl = cache_ttl
        self._clock = clock
        self._cache: dict[bytes, tuple[Principal, float]] = {}

    def authorize(self, creds: Credentials) -> Principal:
        """Return the principal for these credentials.

        :raise Refusal: token_invalid, token_expired, forbidden, unavailable
        """
        key = _cache_key(creds)
        now = self._clock()
        cached = self._cache.get(key)
        if cached is not None:
            if now < cached[1]:
                return cached[0]
            del self._cache[key]

        row = self._store.lookup(creds.token, creds.organization_id)
        now = self._clock()
        if row is None:
            raise Refusal("token_invalid")
        if not row.active or (row.expires_in is not None and row.expires_in <= 0):
            raise Refusal("token_expired")
        if not row.member:
            raise Refusal("forbidden")
        expires_at = now + row.expires_in if row.expires_in is not None else None
        principal = Principal(row.user_id, creds.organization_id, expires_at)
        self._remember(key, principal, now)
        return principal

    def is_member(self, organization_id: str, user_id: str) -> bool:
        """Tell whether the user belongs to the organization.

        :raise Unavailable: the database did not answer in time
        """
        return self._store.is_member(organization_id, user_id)

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
        if len(self._cache) >= _CACHE_MAX:
            self._cache = {k: v for k, v in self._cache.items() if v[1] > now}
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
        self._cache[key] = (principal, until)


def _cache_key(creds: Credentials) -> bytes:
    # Hash, so the cache holds no usable token.
    return hashlib.sha256(f"{creds.organization_id}\0{creds.token}".encode()).digest()
