"""The recovery history's bounds, on each store, against the real Postgres and Redis.

``history_since`` answers what followed an offset in some rooms, in order,
once each — or None when the history no longer holds all of it (trimmed by
count or by age), so that a client is never told it was recovered when it
missed something. Sessions are taken once, within the window.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import unique

from app.bus.envelope import Publication
from app.bus.postgres import SCHEMA_SQL, PostgresBus
from app.bus.redis import SESSION_PREFIX, RedisBus
from app.db import Database
from app.realtime.recovery import Recovery, Saved

SIZE = 3
WINDOW = 1.0


class Store:
    """A bus with its history, and what a test needs to age it."""

    def __init__(self, bus: Any, kind: str, postgres: Any) -> None:
        self.bus = bus
        self.kind = kind
        self._postgres = postgres

    def publish(self, rooms: tuple[str, ...], value: str, except_rooms: tuple[str, ...] = ()) -> str:
        """Publish one recorded event; return its offset."""
        self.bus.publish(Publication(rooms=rooms, args=json.dumps(["news", value]), except_rooms=except_rooms))
        return str(self.bus.history_head())

    def since(self, offset: str, rooms: list[str]) -> list[str] | None:
        events = self.bus.history_since(offset, rooms)
        return None if events is None else [json.loads(args)[1] for _, args, _ in events]

    def age(self, room: str) -> None:
        """Make what ``room`` holds older than the window, and let the store trim."""
        if self.kind == "postgres":
            self._postgres.psql(f"UPDATE orgcast.history SET created_at = now() - interval '1 hour' "
                                f"WHERE room = '{room}'")
            self.bus.cleanup()
        else:
            time.sleep(WINDOW + 0.1)  # Redis trims by the IDs it gives from its clock, at the next add

    def trim(self) -> None:
        """Let the store apply its count bound (Redis does at each add; Postgres in its cleanup)."""
        if self.kind == "postgres":
            self.bus.cleanup()


@pytest.fixture(scope="module")
def schema(postgres: Any) -> None:
    postgres.psql(SCHEMA_SQL)


@pytest.fixture(params=["postgres", "redis"])
def store(request: pytest.FixtureRequest, postgres: Any, redis_server: Any, schema: None) -> Iterator[Store]:
    if request.param == "postgres":
        db = Database(postgres.dsn, pool_size=2, timeout=5)
        yield Store(PostgresBus(db, postgres.dsn, history=(WINDOW, SIZE)), "postgres", postgres)
        db.close()
    else:
        bus = RedisBus(redis_server.url, timeout=5, emitter_prefix="socket.io", history=(WINDOW, SIZE))
        yield Store(bus, "redis", postgres)
        bus.stop()


def test_what_followed_an_offset_in_order_and_once(store: Store) -> None:
    a, b, c = unique("room"), unique("room"), unique("room")
    start = store.publish((a,), "before")
    store.publish((a, b), "both")
    store.publish((c,), "elsewhere")
    store.publish((b,), "b")
    last = store.publish((a,), "a")
    assert store.since(start, [a, b]) == ["both", "b", "a"]
    assert store.since(start, [c]) == ["elsewhere"]
    assert store.since(last, [a, b]) == []


def test_offsets_increase_across_rooms(store: Store) -> None:
    a, b = unique("room"), unique("room")
    first, second = store.publish((a,), "1"), store.publish((b,), "2")
    assert [int(p) for p in second.split("-")] > [int(p) for p in first.split("-")]


def test_beyond_the_count_bound_the_history_refuses(store: Store) -> None:
    room = unique("room")
    start = store.publish((room,), "0")
    offsets = [store.publish((room,), str(n)) for n in range(1, SIZE + 2)]
    store.trim()
    assert store.since(start, [room]) is None  # "1" was trimmed: the client would miss it
    assert store.since(offsets[0], [room]) == [str(n) for n in range(2, SIZE + 2)]


def test_beyond_the_age_bound_the_history_refuses(store: Store) -> None:
    room = unique("room")
    start = store.publish((room,), "old-start")
    first = store.publish((room,), "old")
    store.age(room)
    store.publish((room,), "new")
    assert store.since(start, [room]) is None
    assert store.since(first, [room]) == ["new"]


def test_a_trimmed_room_does_not_refuse_for_another(store: Store) -> None:
    busy, quiet = unique("room"), unique("room")
    start = store.publish((quiet,), "q")
    for n in range(SIZE + 2):
        store.publish((busy,), str(n))
    store.trim()
    assert store.since(start, [quiet]) == []


@pytest.mark.parametrize("offset", ["", "abc", "1.5", "-1", "9" * 40, "1-2-3"])
def test_an_offset_the_store_never_gave_is_not_recovered(store: Store, offset: str) -> None:
    assert store.since(offset, [unique("room")]) is None


def test_the_except_rooms_are_honoured(store: Store) -> None:
    room, muted = unique("room"), unique("room")
    start = store.publish((room,), "before")
    store.publish((room,), "not for muted", except_rooms=(muted,))
    recovery = Recovery(store.bus, window=60)
    assert [json.loads(args)[1] for _, args in recovery.missed(start, [room, muted]) or []] == []
    assert [json.loads(args)[1] for _, args in recovery.missed(start, [room]) or []] == ["not for muted"]


def test_a_session_is_taken_once_and_only_within_the_window(store: Store, postgres: Any,
                                                             redis_server: Any) -> None:
    recovery = Recovery(store.bus, window=WINDOW)
    saved = Saved("sid-1", "u-1", ["org-a"], "7", time.time())
    pid, stale = recovery.new_pid(), recovery.new_pid()
    recovery.save([(pid, saved), (stale, saved)])
    assert recovery.take(pid) == saved
    assert recovery.take(pid) is None
    assert recovery.take("no-such-pid") is None
    if store.kind == "postgres":
        postgres.psql(f"UPDATE orgcast.sessions SET created_at = now() - interval '1 hour' WHERE pid = '{stale}'")
        assert recovery.take(stale) is None
    else:
        import redis

        ttl = redis.Redis.from_url(redis_server.url).pttl(SESSION_PREFIX + stale)
        assert 0 < ttl <= WINDOW * 1000
    late = Recovery(store.bus, window=WINDOW, clock=lambda: time.time() + WINDOW + 1)
    other = recovery.new_pid()
    recovery.save([(other, saved)])
    assert late.take(other) is None  # past the window by the record's own clock too


def test_sessions_taken_together_are_each_answered_once(store: Store) -> None:
    """A restart's reconnects take their sessions in one round trip (``take_sessions``)."""
    recovery = Recovery(store.bus, window=WINDOW)
    records = [(recovery.new_pid(), Saved(f"sid-{i}", f"u-{i}", ["org-a"], "7", time.time())) for i in range(3)]
    recovery.save(records)
    (a, _), (b, _), (c, _) = records
    answers = store.bus.take_sessions([a, "no-such-pid", b, a, c])
    assert [json.loads(r)["sid"] if r else None for r in answers] == ["sid-0", None, "sid-1", None, "sid-2"]
    assert store.bus.take_sessions([a, b, c]) == [None, None, None]


def test_questions_asked_together_get_the_answers_asked_alone(store: Store) -> None:
    """A restart's reconnects read what they missed in one round trip (``history_since_many``)."""
    a, b, full = unique("room"), unique("room"), unique("room")
    start = store.publish((a,), "before")
    gone = store.publish((full,), "0")
    for n in range(1, SIZE + 2):
        store.publish((full,), str(n))
    mid = store.publish((a, b), "both")
    store.publish((b,), "b")
    last = store.publish((a,), "a")
    store.trim()
    queries = [(start, [a]), (mid, [a, b]), (start, [a, b]), ("not an offset", [a]), (last, [a, b]),
               (start, [unique("room")]), (gone, [full, a]), (start, [a])]
    together = store.bus.history_since_many(queries)
    assert together == [store.bus.history_since(offset, rooms) for offset, rooms in queries]
    values = [None if t is None else [json.loads(args)[1] for _, args, _ in t] for t in together]
    assert values == [["both", "a"], ["b", "a"], ["both", "b", "a"], None, [], [], None, ["both", "a"]]
