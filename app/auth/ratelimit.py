"""Failed authorizations per client address: past a limit in a window, refuse without asking the database.

``FailureCounter`` counts in this process, in fixed windows, with bounded
memory whatever the number of addresses. ``RedisFailureCounter`` shares the
count between every worker and instance through Redis (``INCR`` with an
expiry), and falls back to its local counter while Redis does not answer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from app.gather import Shared

log = logging.getLogger(__name__)


class FailureCounter:
    """Failures per address in windows of ``window`` seconds, in this process."""

    def __init__(self, limit: int, window: float, max_addresses: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self._max = max_addresses
        self._clock = clock
        #: address -> [window start, failures]; insertion order is age order
        self._counts: dict[str, list[float]] = {}

    def limited(self, address: str) -> bool:
        """Tell whether ``address`` has failed ``limit`` times in its current window."""
        entry = self._counts.get(address)
        if entry is None:
            return False
        if self._clock() - entry[0] >= self.window:
            del self._counts[address]
            return False
        return entry[1] >= self.limit

    def failed(self, address: str) -> None:
        """Count one failed authorization of ``address``."""
        now = self._clock()
        entry = self._counts.get(address)
        if entry is None or now - entry[0] >= self.window:
            self._counts.pop(address, None)
            if len(self._counts) >= self._max:
                self._evict(now)
            self._counts[address] = [now, 1.0]
        else:
            entry[1] += 1

    def _evict(self, now: float) -> None:
        for address in [a for a, (start, _) in self._counts.items() if now - start >= self.window]:
            del self._counts[address]
        while len(self._counts) >= self._max:  # all recent: drop the oldest
            del self._counts[next(iter(self._counts))]

    def __len__(self) -> int:
        return len(self._counts)


class RedisFailureCounter(FailureCounter):
    """The same count, shared through Redis by every worker and instance."""

    def __init__(self, client: Any, prefix: str, limit: int, window: float) -> None:
        super().__init__(limit, window)
        self._client = client
        self._prefix = prefix
        self._warned = False
        # Every connect asks; in a storm (or behind one proxy address) thousands
        # at once ask the same: those in flight together share one GET.
        self._get: Shared[str, Any] = Shared(lambda address: self._client.get(self._prefix + address))

    def limited(self, address: str) -> bool:
        try:
            value = self._get(address)
        except Exception as exc:  # Redis down or slow: count in this process meanwhile
            self._redis_failed(exc)
            return super().limited(address)
        return value is not None and int(value) >= self.limit

    def failed(self, address: str) -> None:
        key = self._prefix + address
        try:
            pipe = self._client.pipeline()
            pipe.incr(key)
            pipe.expire(key, max(1, int(self.window + 0.999)), nx=True)
            pipe.execute()
        except Exception as exc:
            self._redis_failed(exc)
            super().failed(address)

    def _redis_failed(self, exc: Exception) -> None:
        if not self._warned:
            self._warned = True
            log.warning("rate limiting counts in this process only while Redis does not answer (%s)",
                        type(exc).__name__)
