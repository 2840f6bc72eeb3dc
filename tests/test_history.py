"""The log's positions and the history's bounds, on each backend, against the real Postgres and Redis.

``since_many`` answers what followed a position in some rooms, through
another, in order, once each — or None when the history no longer holds
all of it (trimmed by count, older than the window, or a position the log
never gave), so that a client is never told it was recovered when it
missed something.
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
from app.bus.postgres_store import PostgresStore
from app.bus.redis import RedisBus
from app.bus.redis_store import RedisStore
from app.db import Database

SIZE = 3
WINDOW = 1.0


class Store:
    """A log and its store, and what a test needs to age them."""

    def __init__(self, log: Any, store: Any, kind: str, postgres: Any) -> None:
        self.log = log
        self.store = store
        self.kind = kind
        self._postgres = postgres

    def publish(self, rooms: tuple[str, ...], value: str, except_rooms: tuple[str, ...] = ()) -> int:
        """Append one event; return its position."""
        return int(self.log.append(Publication(rooms=rooms, args=json.dumps(["news", value]),
                                               except_rooms=except_rooms)))

    def since(self, after: int, rooms: list[str], through: int | None = None) -> list[str] | None:
        events = self.store.since_many([(after, self.log.head() if through is None else through, rooms)])[0]
        return None if events is None else [json.loads(args)[1] for _, args, _ in events]

    def age(self, room: str) -> None:
        """Make what ``room`` holds older than the window."""
        if self.kind == "postgres":
            self._postgres.psql(f"UPDATE orgcast.history SET created_at = now() - interval '1 hour' "
                                f"WHERE room = '{room}'")
        else:
            time.sleep(WINDOW + 0.1)

    def trim(self) -> None:
        """Let the store apply its count bound (Redis does at each add; Postgres in its cleanup)."""
        if self.kind == "postgres":
            self.log.cleanup()


@pytest.fixture(scope="module")
def schema(postgres: Any) -> None:
    postgres.psql(SCHEMA_SQL)


@pytest.fixture(params=["postgres", "redis"])
def store(request: pytest.FixtureRequest, postgres: Any, redis_server: Any, schema: None) -> Iterator[Store]:
    if request.param == "postgres":
        db = Database(postgres.dsn, pool_size=2, timeout=5)
        log = PostgresBus(db, postgres.dsn, window=WINDOW, history_size=SIZE)
        yield Store(log, PostgresStore(db, WINDOW), "postgres", postgres)
        db.close()
    else:
        bus = RedisBus(redis_server.url, timeout=5, emitter_prefix="socket.io", window=WINDOW, history_size=SIZE)
        yield Store(bus, RedisStore(bus.client, WINDOW, SIZE), "redis", postgres)
        bus.stop()


def test_what_followed_a_position_in_order_and_once(store: Store) -> None:
    a, b, c = unique("room"), unique("room"), unique("room")
    start = store.publish((a,), "before")
    store.publish((a, b), "both")
    store.publish((c,), "elsewhere")
    middle = store.publish((b,), "b")
    last = store.publish((a,), "a")
    assert store.since(start, [a, b]) == ["both", "b", "a"]
    assert store.since(start, [a, b], through=middle) == ["both", "b"]
    assert store.since(start, [c]) == ["elsewhere"]
    assert store.since(last, [a, b]) == []


def test_positions_increase_across_rooms_and_follow_the_appends(store: Store) -> None:
    a, b = unique("room"), unique("room")
    positions = [store.publish((a,), "1"), store.publish((b,), "2"), store.publish((a,), "3")]
    assert positions == sorted(positions) and len(set(positions)) == 3
    assert store.log.head() >= positions[-1]


def test_beyond_the_count_bound_the_history_refuses(store: Store) -> None:
    room = unique("room")
    start = store.publish((room,), "0")
    positions = [store.publish((room,), str(n)) for n in range(1, SIZE + 2)]
    store.trim()
    assert store.since(start, [room]) is None  # "1" was trimmed: the client would miss it
    assert store.since(positions[0], [room]) == [str(n) for n in range(2, SIZE + 2)]


def test_what_is_older_than_the_window_is_not_recovered(store: Store) -> None:
    room = unique("room")
    start = store.publish((room,), "old-start")
    first = store.publish((room,), "old")
    store.age(room)
    store.publish((room,), "new")
    assert store.since(start, [room]) is None
    if store.kind == "postgres":
        assert store.since(first, [room]) == ["new"]


def test_a_trimmed_room_does_not_refuse_for_another(store: Store) -> None:
    busy, quiet = unique("room"), unique("room")
    start = store.publish((quiet,), "q")
    for n in range(SIZE + 2):
        store.publish((busy,), str(n))
    store.trim()
    assert store.since(start, [quiet]) == []


def test_a_position_the_log_never_gave_is_not_recovered(store: Store) -> None:
    head = store.log.head()
    assert store.since(head + 10**9, [unique("room")], through=head + 10**9) is None
    assert store.since(-1, [unique("room")]) is None


def test_the_except_rooms_are_kept(store: Store) -> None:
    room, muted = unique("room"), unique("room")
    start = store.publish((room,), "before")
    store.publish((room,), "not for muted", except_rooms=(muted,))
    events = store.store.since_many([(start, store.log.head(), [room])])[0]
    assert [(json.loads(args)[1], excepted) for _, args, excepted in events] == [("not for muted", (muted,))]


def test_the_latest_of_a_room_oldest_first(store: Store) -> None:
    room, other = unique("room"), unique("room")
    positions = [store.publish((room,), str(n)) for n in range(3)]
    store.publish((other,), "elsewhere")
    assert [json.loads(a)[1] for _, a, _ in store.store.latest(room, 2, store.log.head())] == ["1", "2"]
    assert [json.loads(a)[1] for _, a, _ in store.store.latest(room, 5, positions[1])] == ["0", "1"]


def test_organizations_are_kept_and_the_secret_is_one(store: Store) -> None:
    sid = unique("sid")
    assert store.store.load_organizations([sid]) == [None]
    store.store.save_organizations(sid, ["org-a", "org-b"])
    store.store.keep_organizations([sid])
    assert store.store.load_organizations([sid, unique("sid")]) == [["org-a", "org-b"], None]
    assert store.store.secret() == store.store.secret() and len(store.store.secret()) == 32


def test_questions_asked_together_get_the_answers_asked_alone(store: Store) -> None:
    """A restart's reconnects read what they missed in one round trip (``since_many``)."""
    a, b, full = unique("room"), unique("room"), unique("room")
    start = store.publish((a,), "before")
    gone = store.publish((full,), "0")
    for n in range(1, SIZE + 2):
        store.publish((full,), str(n))
    mid = store.publish((a, b), "both")
    store.publish((b,), "b")
    last = store.publish((a,), "a")
    store.trim()
    head = store.log.head()
    queries = [(start, head, [a]), (mid, head, [a, b]), (start, head, [a, b]), (last, head, [a, b]),
               (start, head, [unique("room")]), (gone, head, [full, a]), (start, mid, [a])]
    together = store.store.since_many(queries)
    assert together == [store.store.since_many([q])[0] for q in queries]
    values = [None if t is None else [json.loads(args)[1] for _, args, _ in t] for t in together]
    assert values == [["both", "a"], ["b", "a"], ["both", "b", "a"], [], [], None, ["both"]]


def test_first_connects_at_once_all_get_the_one_secret(postgres: Any, schema: None) -> None:
    """Workers starting together each ask for the recovery secret (issue 23's test of a slow reader
    found the second one refused ``unavailable``): the ones that wait on another's new row must
    read that row, not an empty snapshot."""
    import gevent
    import psycopg2

    postgres.psql("DELETE FROM orgcast.secrets")
    db = Database(postgres.dsn, pool_size=4, timeout=5)
    first = psycopg2.connect(postgres.dsn)
    try:
        with first.cursor() as cur:  # another worker's insert, not committed yet
            cur.execute("INSERT INTO orgcast.secrets VALUES ('recovery', %s)", ("ab" * 32,))
        store = PostgresStore(db, WINDOW)
        asking = [gevent.spawn(store.secret) for _ in range(3)]
        gevent.sleep(0.3)  # (they now wait on that row's lock: nothing to wait on to know it)
        assert not any(g.ready() for g in asking)
        first.commit()
        gevent.joinall(asking, timeout=5, raise_error=True)
        assert [g.value for g in asking] == [bytes.fromhex("ab" * 32)] * 3
    finally:
        first.close()
        db.close()


def test_a_key_outlives_the_log_window_for_the_idempotency_window(postgres: Any, schema: None) -> None:
    """The key sits on its log entry's row: the log's cleanup keeps a keyed entry until the
    idempotency window has passed too, and past it the key may be used again."""
    db = Database(postgres.dsn, pool_size=2, timeout=5)
    bus = PostgresBus(db, postgres.dsn, window=WINDOW, history_size=SIZE, idempotency_window=300)
    try:
        room, key = unique("room"), unique("key")

        def publish() -> int | None:
            return bus.append(Publication(rooms=(room,), args=json.dumps(["news", key])), key)

        first = publish()
        assert first is not None and publish() is None
        postgres.psql(f"UPDATE orgcast.log SET created_at = now() - interval '200 seconds' WHERE position = {first}")
        bus.cleanup()  # past the log's window (60 s at least), within the key's: kept
        assert postgres.psql(f"SELECT count(*) FROM orgcast.log WHERE position = {first}").strip() == "1"
        assert publish() is None
        postgres.psql(f"UPDATE orgcast.log SET created_at = now() - interval '400 seconds' WHERE position = {first}")
        again = publish()  # past the key's window, not cleaned up yet: let go, then taken
        assert again is not None and again > first
        assert publish() is None
        bus.cleanup()
        assert postgres.psql(f"SELECT count(*) FROM orgcast.log WHERE position = {first}").strip() == "0"
    finally:
        db.close()
