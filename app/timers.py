"""One heap of deadlines per process, served by one greenlet.

Sessions that must be admitted within ``ORGCAST_CONNECT_TIMEOUT`` (and,
later, pings and token expiry) put a deadline here instead of starting a
greenlet or a libev timer each: thousands of idle sockets cost one heap
entry each and a single wake-up per ``resolution``.

A callback never waits on I/O (a slow bus or database would delay every
timer of the worker): one that must — closing a session runs its
disconnect handlers — hands the work to a greenlet (the session's own, or
a new one) and returns.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event

log = logging.getLogger(__name__)


class Timer:
    """A scheduled call; ``cancel()`` makes it a no-op."""

    __slots__ = ("callback", "args")

    def __init__(self, callback: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.callback: Callable[..., Any] | None = callback
        self.args = args

    def cancel(self) -> None:
        """Do not run this call (it stays in the heap until its time, then is skipped)."""
        self.callback = None
        self.args = ()

    @property
    def active(self) -> bool:
        return self.callback is not None


class Timers:
    """Run callbacks at monotonic deadlines, in order, from one greenlet."""

    #: at most this late (10 ms: a ping timeout closes the session when Node's would, give or take
    #: a scheduler tick), and at most one wake-up per resolution however many deadlines are near
    def __init__(self, resolution: float = 0.01, clock: Callable[[], float] = time.monotonic) -> None:
        self._heap: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._wake = gevent.event.Event()
        self._resolution = resolution
        self._clock = clock
        self._runner: gevent.Greenlet | None = None

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> Timer:
        """Run ``callback(*args)`` in ``delay`` seconds; return a handle to cancel it."""
        timer = Timer(callback, args)
        when = self._clock() + max(0.0, delay)
        first = not self._heap or when < self._heap[0][0]
        heapq.heappush(self._heap, (when, next(self._seq), timer))
        if self._runner is None:
            self._runner = gevent.spawn(self._run)
        elif first:
            self._wake.set()
        return timer

    def __len__(self) -> int:
        return len(self._heap)

    def _run(self) -> None:
        while True:
            self._wake.clear()
            if not self._heap:
                self._wake.wait()
                continue
            delay = self._heap[0][0] - self._clock()
            if delay > 0:
                self._wake.wait(max(delay, self._resolution))
                continue
            now = self._clock()
            while self._heap and self._heap[0][0] <= now:
                _, _, timer = heapq.heappop(self._heap)
                callback, args = timer.callback, timer.args
                if callback is None:
                    continue
                timer.cancel()
                try:
                    callback(*args)
                except Exception:
                    log.exception("timer callback failed")
