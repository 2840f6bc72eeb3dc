"""Lookups made at the same moment, answered together: what a reconnect storm needs.

When a worker restarts, thousands of clients come back within a second,
each wanting its kept session and what it missed. One round trip each is
thousands of statements (and, with 10 connections, a queue long enough to
time out); gathered, it is a few.

- ``Gathered``: calls made while one is under way wait and are answered by
  the next single call of ``many(keys)`` (DataLoader's batching, for
  greenlets; no gevent library does it). The first call goes at once: a
  lone caller waits for nothing.
- ``Shared``: identical calls in flight share the first one's answer
  (single flight).

Both use ``threading`` primitives, which gevent's monkey-patching turns into
greenlet ones (and which keep the unit tests plain threads).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")
H = TypeVar("H", bound=Hashable)


class _Call(Generic[K]):
    __slots__ = ("key", "value", "error", "answered", "woken")

    def __init__(self, key: K) -> None:
        self.key = key
        self.value: Any = None
        self.error: BaseException | None = None
        self.answered = False
        self.woken = threading.Event()

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


class Gathered(Generic[K, V]):
    """``many(keys) -> values`` (one per key, in order) called for every waiting key at once."""

    def __init__(self, many: Callable[[list[K]], list[V]], most: int = 500) -> None:
        self._many = many
        self._most = most
        self._lock = threading.Lock()
        self._queue: list[_Call[K]] = []
        #: a call is under way; invariant: not busy => the queue is empty
        self._busy = False
        #: calls of many() made, for the tests and the curious
        self.rounds = 0

    def __call__(self, key: K) -> V:
        call = _Call(key)
        with self._lock:
            self._queue.append(call)
            leading, self._busy = not self._busy, True
        if not leading:
            call.woken.wait()  # answered, or handed the lead
        if not call.answered:
            self._round()  # the leader is first in the queue: this answers it
        result: V = call.result()
        return result

    def _round(self) -> None:
        with self._lock:
            batch, self._queue = self._queue[:self._most], self._queue[self._most:]
        self.rounds += 1
        try:
            values = self._many([c.key for c in batch])
            if len(values) != len(batch):
                raise RuntimeError(f"{len(values)} answers to {len(batch)} keys")
            for c, v in zip(batch, values, strict=True):
                c.value = v
        except BaseException as exc:  # the round's callers share its failure (a kill too)
            error = exc if isinstance(exc, Exception) else RuntimeError("the lookup was interrupted")
            for c in batch:
                c.error = error
            if not isinstance(exc, Exception):
                raise
        finally:
            with self._lock:
                after = self._queue[0] if self._queue else None
                self._busy = after is not None
            for c in batch:
                c.answered = True
                c.woken.set()
            if after is not None:
                after.woken.set()  # not answered: it leads the next round


class Shared(Generic[H, V]):
    """``one(key)``, with identical calls in flight answered by the first one's answer."""

    def __init__(self, one: Callable[[H], V]) -> None:
        self._one = one
        self._lock = threading.Lock()
        self._flying: dict[H, _Call[H]] = {}
        #: calls of one() made, and calls that joined one in flight
        self.calls = self.joined = 0

    def __call__(self, key: H) -> V:
        with self._lock:
            call = self._flying.get(key)
            leading = call is None
            if call is None:
                call = self._flying[key] = _Call(key)
            else:
                self.joined += 1
        if not leading:
            call.woken.wait()
            result: V = call.result()
            return result
        self.calls += 1
        try:
            call.value = self._one(key)
        except BaseException as exc:
            call.error = exc if isinstance(exc, Exception) else RuntimeError("the lookup was interrupted")
            raise
        finally:
            with self._lock:
                del self._flying[key]
            call.answered = True
            call.woken.set()
        return call.value  # type: ignore[no-any-return]
