"""Presence's logic (``app/realtime/presence.py``) on an in-memory store shared by several workers,
where the end-to-end tests cannot steer it: an event once per user, not per socket and not per
worker; a page reload within the linger says nothing; a store that fails loses no change and keeps
their order; a gone worker's users leave only where nobody else holds them; and the routes' sums."""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import gevent
import pytest

from app.errors import Unavailable
from app.realtime import presence as presence_module
from app.realtime.presence import JOIN, LEAVE, Presence


class Store:
    """What the Redis and Postgres stores do: which workers hold a user in an organization."""

    def __init__(self) -> None:
        self.holders: dict[tuple[str, str], set[str]] = defaultdict(set)
        #: calls to fail with Unavailable before the store answers again
        self.failures = 0

    def _check(self) -> None:
        if self.failures:
            self.failures -= 1
            raise Unavailable("the store is down")

    def presence_join(self, organization_id: str, user_id: str, worker: str) -> bool:
        self._check()
        holders = self.holders[(organization_id, user_id)]
        first = not holders
        holders.add(worker)
        return first

    def presence_leave(self, organization_id: str, user_id: str, worker: str) -> bool:
        self._check()
        holders = self.holders[(organization_id, user_id)]
        was = worker in holders
        holders.discard(worker)
        return was and not holders

    def presence_forget(self, worker: str) -> list[tuple[str, str]]:
        self._check()
        gone = []
        for pair, holders in self.holders.items():
            if worker in holders:
                holders.discard(worker)
                if not holders:
                    gone.append(pair)
        return gone

    def presence_workers(self) -> set[str]:
        return {w for holders in self.holders.values() for w in holders}


class Answers:
    def __init__(self, by_peer: dict[str, Any], partial: bool = False) -> None:
        self.by_peer, self.partial = by_peer, partial


class Cluster:
    def __init__(self, peer: str, workers: list[Presence] | None = None) -> None:
        self.peer = peer
        self.workers = workers if workers is not None else []
        self.silent: set[str] = set()

    def ask(self, what: str, arg: str = "") -> Answers:
        by_peer = {}
        for worker in self.workers:
            if worker._cluster.peer in self.silent:
                continue
            here = worker.organization_here(arg) if what == "presence.organization" else worker.user_here(arg)
            by_peer[worker._cluster.peer] = here
        return Answers(by_peer, partial=bool(self.silent))

    def alive(self) -> list[str]:
        return [w._cluster.peer for w in self.workers]


class Events:
    """What the workers emitted and the webhooks were told, in order."""

    def __init__(self) -> None:
        self.emitted: list[tuple[str, str, str, list[str], list[str]]] = []
        self.told: list[tuple[bool, str, str]] = []

    def emit(self, rooms: list[str], except_rooms: list[str], args: list[Any], source: str) -> None:
        self.emitted.append((args[0], args[1]["organizationId"], args[1]["userId"], rooms, except_rooms))

    def on_change(self, joined: bool, organization_id: str, user_id: str) -> None:
        self.told.append((joined, organization_id, user_id))

    def names(self) -> list[tuple[str, str, str]]:
        return [(event, organization_id, user_id) for event, organization_id, user_id, _, _ in self.emitted]


def wait_for(check: Any, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        gevent.sleep(0.005)


def settle() -> None:
    """Let every runner apply what it has queued (they run in this process's hub)."""
    for _ in range(5):
        gevent.sleep(0)


@pytest.fixture
def deployment() -> Any:
    store, events, workers, clusters = Store(), Events(), [], []
    rooms: dict[str, dict[str, set[str]]] = {}

    def make(n: int, linger: float = 0.0) -> Presence:
        cluster = Cluster(f"worker-{n}", workers)
        room_of = rooms.setdefault(cluster.peer, defaultdict(set))
        worker = Presence(cluster, members=lambda room: sorted(room_of[room]), user_of=lambda sid: sid.split("/")[0],
                          organizations_of=lambda sid: [r.split(".", 1)[1] for r, sids in room_of.items()
                                                        if r.startswith("organization.") and sid in sids],
                          store=store, emitter=events, linger=linger, on_change=events.on_change)
        worker.rooms = room_of  # type: ignore[attr-defined]
        workers.append(worker)
        clusters.append(cluster)
        worker.start()
        return worker

    yield store, events, make
    for worker in workers:
        worker.stop()


def connect(worker: Presence, sid: str, organization_id: str) -> None:
    """A socket ``<user>/<n>`` of this worker in the organization's and its user's rooms."""
    worker.rooms[f"organization.{organization_id}"].add(sid)  # type: ignore[attr-defined]
    worker.rooms[f"user.{sid.split('/')[0]}"].add(sid)  # type: ignore[attr-defined]
    worker.entered(organization_id, sid.split("/")[0])


def disconnect(worker: Presence, sid: str, organization_id: str) -> None:
    worker.rooms[f"organization.{organization_id}"].discard(sid)  # type: ignore[attr-defined]
    worker.rooms[f"user.{sid.split('/')[0]}"].discard(sid)  # type: ignore[attr-defined]
    worker.left(organization_id, sid.split("/")[0])


def test_one_join_and_one_leave_per_user_across_sockets_and_workers(deployment: Any) -> None:
    store, events, make = deployment
    w0, w1 = make(0), make(1)
    connect(w0, "alice/1", "7")
    wait_for(lambda: events.names() == [(JOIN, "7", "alice")])
    connect(w0, "alice/2", "7")
    connect(w1, "alice/3", "7")
    disconnect(w0, "alice/1", "7")
    disconnect(w0, "alice/2", "7")  # w0 has none left, but w1 still holds her
    settle()
    assert events.names() == [(JOIN, "7", "alice")]
    assert store.holders[("7", "alice")] == {"worker-1"}
    disconnect(w1, "alice/3", "7")
    wait_for(lambda: events.names() == [(JOIN, "7", "alice"), (LEAVE, "7", "alice")])
    assert events.told == [(True, "7", "alice"), (False, "7", "alice")]
    # the organization hears it, the user's own sockets do not
    assert all(rooms == ["organization.7"] and except_rooms == ["user.alice"]
               for _, _, _, rooms, except_rooms in events.emitted)


def test_a_reload_within_the_linger_says_nothing_and_a_real_leave_is_told_after_it(deployment: Any) -> None:
    _, events, make = deployment
    worker = make(0, linger=0.2)
    connect(worker, "bob/1", "7")
    wait_for(lambda: events.names() == [(JOIN, "7", "bob")])
    disconnect(worker, "bob/1", "7")
    connect(worker, "bob/2", "7")  # the page came back at once
    gevent.sleep(0.3)  # past the linger: a leave would be told by now
    assert events.names() == [(JOIN, "7", "bob")]
    left_at = time.monotonic()
    disconnect(worker, "bob/2", "7")
    wait_for(lambda: events.names() == [(JOIN, "7", "bob"), (LEAVE, "7", "bob")])
    assert time.monotonic() - left_at >= 0.2 - 0.02, "told before the linger ran out"


def test_a_store_that_fails_loses_no_change_and_keeps_their_order(deployment: Any, monkeypatch: Any) -> None:
    store, events, make = deployment
    slept: list[float] = []
    real_sleep = gevent.sleep
    monkeypatch.setattr(presence_module.gevent, "sleep", lambda s=0: (slept.append(s), real_sleep(0))[1])
    worker = make(0)
    store.failures = 3
    connect(worker, "carol/1", "7")
    disconnect(worker, "carol/1", "7")
    connect(worker, "dave/1", "8")
    wait_for(lambda: len(events.emitted) == 3)
    assert events.names() == [(JOIN, "7", "carol"), (LEAVE, "7", "carol"), (JOIN, "8", "dave")]
    assert slept.count(1.0) == 3, "each failure waits a second before the retry"


def test_a_gone_worker_s_users_leave_only_where_no_other_worker_holds_them(deployment: Any,
                                                                           monkeypatch: Any) -> None:
    store, events, make = deployment
    monkeypatch.setattr(presence_module, "GRACE", 0.05)
    w0, w1, dead = make(0), make(1), make(2)
    connect(dead, "erin/1", "7")
    connect(dead, "frank/1", "7")
    connect(w1, "frank/2", "7")
    wait_for(lambda: len(events.emitted) == 2)
    w0.forget("worker-2")
    w0.forget("worker-0")  # itself: nothing
    wait_for(lambda: len(events.emitted) == 3)
    settle()
    assert events.names()[2:] == [(LEAVE, "7", "erin")]
    assert store.holders[("7", "frank")] == {"worker-1"}


def test_a_worker_taken_for_gone_notes_its_users_again_without_a_second_join(deployment: Any) -> None:
    store, events, make = deployment
    worker = make(0)
    connect(worker, "gina/1", "7")
    wait_for(lambda: events.names() == [(JOIN, "7", "gina")])
    store.presence_forget("worker-0")  # another worker forgot it (it was stopped a while)
    worker.taken_for_gone()
    wait_for(lambda: store.holders[("7", "gina")] == {"worker-0"})
    # its users are back in the store; the join they make again is the deployment's first again
    assert events.names() == [(JOIN, "7", "gina"), (JOIN, "7", "gina")]


def test_the_routes_add_up_every_worker_and_say_partial(deployment: Any) -> None:
    _, _, make = deployment
    w0, w1 = make(0), make(1)
    connect(w0, "alice/1", "7")
    connect(w0, "alice/2", "7")
    connect(w1, "alice/3", "8")
    connect(w1, "bob/1", "7")
    assert w0.organization("7") == {
        "organizationId": "7", "userCount": 2, "socketCount": 3, "partial": False,
        "users": [{"userId": "alice", "sockets": 2}, {"userId": "bob", "sockets": 1}]}
    assert w1.user("alice") == {
        "userId": "alice", "socketCount": 3, "partial": False,
        "organizations": [{"organizationId": "7", "sockets": 2}, {"organizationId": "8", "sockets": 1}]}
    w0._cluster.silent.add("worker-1")  # type: ignore[attr-defined]
    answer = w0.organization("7")
    assert answer["partial"] is True and answer["users"] == [{"userId": "alice", "sockets": 2}]


def test_without_events_nothing_is_noted_or_emitted() -> None:
    events = Events()
    worker = Presence(Cluster("worker-0"), members=lambda room: [], user_of=lambda sid: None,
                      organizations_of=lambda sid: [], emitter=events)
    worker.start()
    assert not worker.events
    worker.forget("worker-1")
    worker.taken_for_gone()
    settle()
    assert events.emitted == []
