"""Disconnect sockets when their token expires, and warn them shortly before.

One entry per socket in the process's timer heap (``timers.py``),
not a timer or a query per socket per second: at ``expires - lead`` the
socket receives ``session_expiring {"expiresAt": <ISO 8601 UTC>}`` so the
client can ``refresh``; at ``expires`` it is disconnected. ``lead`` is
``ORGCAST_EXPIRY_WARNING``, or half the token's remaining life when that is
shorter. A ``refresh`` moves both.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

from app.timers import Timer, Timers

log = logging.getLogger(__name__)


def iso_utc(epoch: float) -> str:
    """Format epoch seconds as ISO 8601 UTC with milliseconds: ``2026-12-01T10:00:00.000Z``."""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class ExpiryClock:
    """Warn, then disconnect, each socket at its token's deadline."""

    def __init__(self, timers: Timers, lead: float, warn: Callable[[str, float], None],
                 expire: Callable[[str], None], clock: Callable[[], float] = time.time) -> None:
        self._timers = timers
        self._lead = lead
        self._warn = warn
        self._expire = expire
        self._clock = clock
        self._entries: dict[str, Timer] = {}

    def track(self, sid: str, expires_at: float | None) -> None:
        """(Re)schedule socket ``sid`` for a token expiring at ``expires_at`` (None: never)."""
        self.forget(sid)
        if expires_at is None:
            return
        remaining = expires_at - self._clock()
        lead = min(self._lead, max(0.0, remaining) / 2)
        if lead > 0 and remaining > lead:
            self._entries[sid] = self._timers.call_later(remaining - lead, self._warning_due, sid, expires_at)
        else:
            self._entries[sid] = self._timers.call_later(max(0.0, remaining), self._deadline, sid, expires_at)

    def forget(self, sid: str) -> None:
        """Stop watching socket ``sid`` (it disconnected)."""
        entry = self._entries.pop(sid, None)
        if entry is not None:
            entry.cancel()

    def __len__(self) -> int:
        return len(self._entries)

    def _warning_due(self, sid: str, expires_at: float) -> None:
        self._entries[sid] = self._timers.call_later(max(0.0, expires_at - self._clock()), self._deadline,
                                                     sid, expires_at)
        self._warn(sid, expires_at)

    def _deadline(self, sid: str, expires_at: float) -> None:
        self._entries.pop(sid, None)
        log.info("socket %s: its token expired, disconnecting", sid)
        self._expire(sid)
