"""Unit tests of app/gather.py: calls made together, answered together (plain threads)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from app.gather import Gathered, Shared

WAIT = 5.0


class Gate:
    """A lookup that blocks its first call until released, recording what it was asked."""

    def __init__(self, answer: Any = None) -> None:
        self.asked: list[Any] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self._answer = answer or (lambda keys: [f"v-{k}" for k in keys])

    def many(self, keys: list[Any]) -> list[Any]:
        self.asked.append(list(keys))
        if len(self.asked) == 1:
            self.entered.set()
            assert self.release.wait(WAIT)
        return self._answer(keys)


def waiting(gathered: Any, count: int) -> None:
    """Wait until ``count`` calls are queued behind the one under way."""
    for _ in range(int(WAIT / 0.01)):
        with gathered._lock:
            if len(gathered._queue) >= count:
                return
        threading.Event().wait(0.01)
    raise AssertionError(f"{count} calls never queued")


def joined(shared: Any, count: int) -> None:
    """Wait until ``count`` calls joined the one in flight."""
    for _ in range(int(WAIT / 0.01)):
        if shared.joined >= count:
            return
        threading.Event().wait(0.01)
    raise AssertionError(f"{count} calls never joined")


def test_a_lone_call_goes_at_once() -> None:
    gathered = Gathered(lambda keys: [k * 2 for k in keys])
    assert gathered(21) == 42
    assert gathered(1) == 2
    assert gathered.rounds == 2


def test_calls_made_while_one_is_under_way_are_answered_by_one_more_call() -> None:
    gate = Gate()
    gathered = Gathered(gate.many)
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(gathered, "a")
        assert gate.entered.wait(WAIT)
        rest = [pool.submit(gathered, k) for k in "bcdefg"]
        waiting(gathered, 6)
        gate.release.set()
        assert first.result(WAIT) == "v-a"
        assert [f.result(WAIT) for f in rest] == [f"v-{k}" for k in "bcdefg"]
    assert gate.asked == [["a"], list("bcdefg")]


def test_a_round_takes_at_most_most_keys() -> None:
    gate = Gate()
    gathered = Gathered(gate.many, most=2)
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(gathered, "a")
        assert gate.entered.wait(WAIT)
        rest = [pool.submit(gathered, k) for k in "bcde"]
        waiting(gathered, 4)
        gate.release.set()
        assert [f.result(WAIT) for f in [first, *rest]] == [f"v-{k}" for k in "abcde"]
    assert gate.asked == [["a"], ["b", "c"], ["d", "e"]]


def test_a_failed_round_fails_its_callers_and_the_next_round_goes_on() -> None:
    def answer(keys: list[str]) -> list[str]:
        if "bad" in keys:
            raise ValueError("no")
        return [k.upper() for k in keys]

    gate = Gate(answer)
    gathered = Gathered(gate.many, most=1)
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(gathered, "a")
        assert gate.entered.wait(WAIT)
        bad = pool.submit(gathered, "bad")
        waiting(gathered, 1)
        good = pool.submit(gathered, "c")
        waiting(gathered, 2)
        gate.release.set()
        assert first.result(WAIT) == "A"
        with pytest.raises(ValueError):
            bad.result(WAIT)
        assert good.result(WAIT) == "C"
    assert gathered("z") == "Z"  # not left busy


def test_a_wrong_number_of_answers_is_an_error() -> None:
    gathered = Gathered(lambda keys: [])
    with pytest.raises(RuntimeError):
        gathered("a")


def test_identical_calls_in_flight_share_one_answer() -> None:
    calls: list[str] = []
    entered, release = threading.Event(), threading.Event()

    def one(key: str) -> str:
        calls.append(key)
        if key == "same":
            entered.set()
            assert release.wait(WAIT)
        return key.upper()

    shared = Shared(one)
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(shared, "same")
        assert entered.wait(WAIT)
        others = [pool.submit(shared, "same") for _ in range(5)]
        assert shared("other") == "OTHER"  # another key does not wait
        joined(shared, 5)
        release.set()
        assert [f.result(WAIT) for f in [first, *others]] == ["SAME"] * 6
    assert sorted(calls) == ["other", "same"]
    assert shared("same") == "SAME" and calls.count("same") == 2  # once answered, asked anew


def test_a_shared_failure_reaches_every_caller() -> None:
    entered, release = threading.Event(), threading.Event()

    def one(key: str) -> str:
        entered.set()
        assert release.wait(WAIT)
        raise LookupError(key)

    shared = Shared(one)
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(shared, "k")
        assert entered.wait(WAIT)
        second = pool.submit(shared, "k")
        joined(shared, 1)
        release.set()
        for f in (first, second):
            with pytest.raises(LookupError):
                f.result(WAIT)
