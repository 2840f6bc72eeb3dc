"""Rights re-checked while connected: every ``ORGCAST_REVALIDATE_INTERVAL`` seconds, past the cache.

Each worker takes the tokens and the (organization, user) memberships of
the sockets it holds, distinct, and asks the database about them in
batches of ``BATCH`` (one statement each: the configured SQL of §2 run for
every row of an ``unnest``, ``auth/store.py``), spread over the interval so
that the database sees no burst: 15,000 idle sockets of 5,000 users are a
handful of queries a minute. What no longer holds is taken back: a token
that is gone or expired disconnects its sockets (``revoked`` first, with no
organization), a membership that is gone takes the socket out of that
organization's room (``revoked`` with its id), and a socket left with no
organization is disconnected.

The ``revoke`` route does the same at once, for one pair, on every worker
(a log entry: ``publish/service.py``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import gevent

from app.errors import Unavailable
from app.realtime.background import Background

log = logging.getLogger(__name__)

#: tokens or memberships asked about in one statement
BATCH = 1000


class Checker(Protocol):
    def tokens_now(self, tokens: list[str]) -> dict[str, tuple[str, bool]]: ...
    def members_now(self, pairs: list[tuple[str, str]]) -> set[tuple[str, str]]: ...


class Sockets(Protocol):
    sessions: dict[str, Any]

    def revoke(self, organization_id: str, user_id: str, code: str = "forbidden") -> int: ...
    def token_gone(self, sid: str, code: str) -> None: ...


class Revalidator(Background):
    """This worker's periodic re-check of its sockets' rights."""

    def __init__(self, checker: Checker, sockets: Sockets, interval: float,
                 observer: Callable[[float], None] | None = None) -> None:
        self._checker = checker
        self._sockets = sockets
        self._interval = interval
        self._observer = observer
        #: statements of the last round, for the tests and the curious
        self.queries = 0

    def _wanted(self) -> bool:
        return self._interval > 0

    def _run(self) -> None:
        while True:
            gevent.sleep(self._interval)
            started = time.monotonic()
            try:
                self.round(spread=self._interval * 0.8)
            except Exception:
                log.exception("re-checking the sockets' rights failed")
            if self._observer is not None:
                self._observer(time.monotonic() - started)

    def round(self, spread: float = 0.0) -> None:
        """Re-check every socket of this worker once; the batches ``spread`` over that many seconds."""
        sessions = dict(self._sockets.sessions)
        tokens = sorted({s.token for s in sessions.values() if s.token})
        pairs = sorted({(o, s.user_id) for s in sessions.values() for o in s.organizations})
        batches: list[tuple[str, list[Any]]] = [("tokens", tokens[i:i + BATCH]) for i in range(0, len(tokens), BATCH)]
        batches += [("pairs", pairs[i:i + BATCH]) for i in range(0, len(pairs), BATCH)]
        self.queries = 0
        pause = spread / len(batches) if batches else 0.0
        for n, (kind, batch) in enumerate(batches):
            if n and pause:
                gevent.sleep(pause)
            try:
                if kind == "tokens":
                    self._tokens(batch)
                else:
                    self._pairs(batch)
            except Unavailable as exc:
                log.info("rights not re-checked this round: %s", exc.message)
                return  # the next round asks again
            self.queries += 1

    def _tokens(self, tokens: list[str]) -> None:
        found = self._checker.tokens_now(tokens)
        asked = set(tokens)  # (a list here held the event loop 0.4 s a batch: bench/README.md)
        for sid, session in list(self._sockets.sessions.items()):
            if session.token not in asked:
                continue
            row = found.get(session.token)
            if row is None:
                self._sockets.token_gone(sid, "token_invalid")
            elif row[0] != session.user_id:
                self._sockets.token_gone(sid, "token_invalid")
            elif not row[1]:
                self._sockets.token_gone(sid, "token_expired")

    def _pairs(self, pairs: list[tuple[str, str]]) -> None:
        members = self._checker.members_now(pairs)
        for organization_id, user_id in pairs:
            if (organization_id, user_id) not in members:
                self._sockets.revoke(organization_id, user_id, "forbidden")
