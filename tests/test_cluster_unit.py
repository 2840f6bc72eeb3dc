"""The workers' view of each other (``app/bus/cluster.py``) on an in-process bus that hands every
signal to every worker, as NOTIFY and pub/sub do (the sender too): hellos make them known, a
question is answered by all, a stopped worker makes it partial without hanging it, one not heard
from for ``dead_after`` is gone (once, and told so), and a bye is at once."""

from __future__ import annotations

import time
from typing import Any

import gevent

from app.bus.cluster import Cluster
from app.bus.envelope import Hello, Signal


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Bus:
    def __init__(self) -> None:
        self.clusters: list[Cluster] = []
        #: workers that hear nothing (SIGSTOPped)
        self.stopped: set[str] = set()

    def signal(self, message: Signal) -> None:
        for cluster in self.clusters:
            if cluster.peer not in self.stopped:
                gevent.spawn(cluster.handle, message)


def deployment(count: int, clock: Clock, timeout: float = 0.5) -> tuple[Bus, list[Cluster]]:
    bus = Bus()
    clusters = [Cluster(bus, timeout=timeout, heartbeat=60, dead_after=10, clock=clock) for _ in range(count)]
    for n, cluster in enumerate(clusters):
        cluster.peer = f"worker-{n}"  # (one process here: the real names share host and pid)
        cluster.answer("who", answerer(n))
    bus.clusters = clusters
    for cluster in clusters:
        bus.signal(Hello(cluster.peer, reply=True))
    wait_for(lambda: all(len(c.alive()) == count for c in clusters))
    return bus, clusters


def answerer(n: int) -> Any:
    return lambda arg: {"n": n, "arg": arg}


def wait_for(check: Any, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline
        gevent.sleep(0.005)


def test_every_worker_answers_a_question() -> None:
    _, clusters = deployment(3, Clock())
    answers = clusters[1].ask("who", "x")
    assert answers.partial is False
    assert answers.by_peer == {f"worker-{n}": {"n": n, "arg": "x"} for n in range(3)}
    assert set(answers.latency_ms) == set(answers.by_peer)


def test_a_stopped_worker_makes_the_answer_partial_then_is_gone_once_and_told() -> None:
    clock = Clock()
    bus, clusters = deployment(3, clock)
    gone: list[str] = []
    clusters[0].on_gone.append(gone.append)
    taken: list[bool] = []
    clusters[2].on_taken_for_gone.append(lambda: taken.append(True))
    bus.stopped.add("worker-2")
    started = time.monotonic()
    answers = clusters[0].ask("who")
    assert answers.partial is True and set(answers.by_peer) == {"worker-0", "worker-1"}
    assert time.monotonic() - started < 2, "a stopped worker held the question past its timeout"
    # Others keep saying hello; worker-2 says nothing for dead_after.
    clock.now += 11
    bus.signal(Hello("worker-1"))
    wait_for(lambda: "worker-1" in clusters[0].peers and clusters[0].peers["worker-1"] == clock.now)
    clusters[0]._expire()
    clusters[0]._expire()
    assert gone == ["worker-2"]
    assert clusters[0].alive() == ["worker-0", "worker-1"]
    # It resumes: it hears the bye it was sent from now on, says hello again and is known again.
    bus.stopped.clear()
    clusters[0]._gone("worker-2", tell=True)  # (the bye it missed while stopped, sent once more)
    wait_for(lambda: taken == [True])
    wait_for(lambda: "worker-2" in clusters[0].alive())


def test_a_bye_is_gone_at_once() -> None:
    bus, clusters = deployment(2, Clock())
    gone: list[str] = []
    clusters[0].on_gone.append(gone.append)
    clusters[1].stop()
    bus.stopped.add("worker-1")  # (its process is gone: it hears and answers nothing more)
    wait_for(lambda: gone == ["worker-1"])
    assert clusters[0].alive() == ["worker-0"]
    assert clusters[0].ask("who").by_peer == {"worker-0": {"n": 0, "arg": ""}}
