"""The process's one heap of deadlines (``app/timers.py``) on its own:
calls run in deadline order (ties in the order they were made), never early, a cancelled one never,
an earlier deadline added while the runner sleeps wakes it, and a failing callback stops no other."""

from __future__ import annotations

import time

import gevent
import gevent.event

from app.timers import Timers


def test_calls_run_in_deadline_order_never_early_and_cancelled_ones_never() -> None:
    ran: list[tuple[str, float]] = []
    timers = Timers(resolution=0.001)
    start = time.monotonic()

    def note(name: str) -> None:
        ran.append((name, time.monotonic() - start))

    timers.call_later(0.09, note, "c")
    timers.call_later(0.03, note, "a")
    cancelled = timers.call_later(0.06, note, "cancelled")
    timers.call_later(0.03, note, "a-again")  # the same deadline: after the first, as made
    cancelled.cancel()
    assert not cancelled.active
    deadline = time.monotonic() + 5
    while len(ran) < 3:
        assert time.monotonic() < deadline, ran
        gevent.sleep(0.01)
    assert [name for name, _ in ran] == ["a", "a-again", "c"]
    assert ran[0][1] >= 0.03 and ran[1][1] >= 0.03 and ran[2][1] >= 0.09, ran
    gevent.sleep(0.05)
    assert len(ran) == 3 and len(timers) == 0


def test_an_earlier_deadline_wakes_a_runner_waiting_for_a_later_one() -> None:
    done = gevent.event.Event()
    timers = Timers(resolution=0.001)  # the real clock
    timers.call_later(60, done.set)
    gevent.sleep(0.01)  # the runner now waits for the 60 s deadline
    timers.call_later(0.02, done.set)
    assert done.wait(2), "the runner slept through an earlier deadline"


def test_a_failing_callback_stops_no_other() -> None:
    done = gevent.event.Event()
    ran: list[str] = []
    timers = Timers(resolution=0.001)
    timers.call_later(0.01, lambda: 1 / 0)
    timers.call_later(0.01, ran.append, "after")
    timers.call_later(0.02, done.set)
    assert done.wait(2)
    assert ran == ["after"]
    timers.call_later(0, done.clear)  # the runner is still there
    deadline = time.monotonic() + 2
    while done.is_set():
        assert time.monotonic() < deadline
        gevent.sleep(0.005)
