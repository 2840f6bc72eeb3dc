"""The Postgres bus: NOTIFY to publish, one LISTEN connection per worker to hear.

Messages of 7,900 bytes or more (NOTIFY refuses 8,000) are parked in
``orgcast.bus_messages``, a table of orgcast's own schema that orgcast
creates, and their id is notified instead; every worker reads the row, and
the leader deletes rows older than a minute.

The same connection takes part in electing the *leader*: the one process of
the deployment holding a session advisory lock, which listens to the
channels backends publish on (``orgcast`` for ``pg_notify``, and the
``@socket.io/postgres-emitter`` channel) and hands each notification to the
source handler. The lock goes with the connection: when the leader dies,
another worker takes it within ``LEADER_RETRY`` seconds.

With recovery on, every publication is also a row of ``orgcast.history``
(one per room, all with the offset the publication got from a sequence),
inserted by the statement that notifies it; disconnected sessions wait in
``orgcast.sessions``. The leader trims both by age and the history by count
per room, and notes in ``orgcast.history_trimmed`` how far each room was
trimmed, so that a recovery that would miss events is refused.

A NOTIFY sent while nobody listens is not kept by Postgres: what is
published while a listener reconnects is lost for that listener.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import gevent
import psycopg2
import psycopg2.extensions
from gevent.socket import wait_read

from app.bus.base import UP, Bus, Missed, SourceHandler
from app.bus.envelope import Publication, split_for_offset
from app.db import Database
from app.errors import Unavailable

log = logging.getLogger(__name__)

BUS_CHANNEL = "orgcast_bus"
#: NOTIFY refuses payloads of 8,000 bytes or more
NOTIFY_LIMIT = 7900
#: a key of pg_advisory_lock for the leader (any constant shared by all instances)
LEADER_LOCK = 0x6F726763  # "orgc"
LEADER_RETRY = 2.0
#: seconds of silence after which the connection is checked with a query
KEEPALIVE = 5.0
CLEANUP_EVERY = 10.0
#: seconds a postgres-emitter attachment is kept (Node's Postgres adapter's cleanupInterval)
ATTACHMENTS_FOR = 30
PARKED_FOR = 60

SCHEMA_SQL = """
CREATE SCHEMA IF NOT EXISTS orgcast;
CREATE TABLE IF NOT EXISTS orgcast.bus_messages (
    id         bigserial PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now(),
    payload    text NOT NULL
);
CREATE SEQUENCE IF NOT EXISTS orgcast.history_id;
CREATE TABLE IF NOT EXISTS orgcast.history (
    room         text NOT NULL,
    id           bigint NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    args         text NOT NULL,
    except_rooms text[] NOT NULL DEFAULT '{}',
    PRIMARY KEY (room, id)
);
CREATE INDEX IF NOT EXISTS history_created_at ON orgcast.history (created_at);
CREATE TABLE IF NOT EXISTS orgcast.history_trimmed (
    room    text PRIMARY KEY,
    through bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS orgcast.sessions (
    pid        text PRIMARY KEY,
    record     text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS orgcast.presence (
    organization_id text NOT NULL,
    user_id         text NOT NULL,
    worker          text NOT NULL,
    PRIMARY KEY (organization_id, user_id, worker)
);
CREATE INDEX IF NOT EXISTS presence_worker ON orgcast.presence (worker);
CREATE TABLE IF NOT EXISTS orgcast.presence_count (
    organization_id text NOT NULL,
    user_id         text NOT NULL,
    workers         integer NOT NULL,
    PRIMARY KEY (organization_id, user_id)
);
"""
#: the newest object of SCHEMA_SQL: when it exists, the schema is complete
SCHEMA_LAST = "orgcast.presence_count"

_RECORDED = """
WITH s AS (SELECT nextval('orgcast.history_id') AS id),
     h AS (INSERT INTO orgcast.history (room, id, args, except_rooms)
           SELECT r, s.id, %(args)s, %(except)s::text[] FROM s, unnest(%(rooms)s::text[]) AS r)
"""
# Each statement one transaction; presence_count's row lock orders concurrent
# changes of one (organization, user), so that exactly one of them sees 1 (or 0).
_PRESENCE_JOIN = """
WITH ins AS (INSERT INTO orgcast.presence VALUES (%(org)s, %(user)s, %(worker)s) ON CONFLICT DO NOTHING RETURNING 1),
     cnt AS (INSERT INTO orgcast.presence_count SELECT %(org)s, %(user)s, 1 FROM ins
             ON CONFLICT (organization_id, user_id) DO UPDATE SET workers = orgcast.presence_count.workers + 1
             RETURNING workers)
SELECT workers FROM cnt
"""
_PRESENCE_LEAVE = """
WITH del AS (DELETE FROM orgcast.presence WHERE organization_id = %(org)s AND user_id = %(user)s
             AND worker = %(worker)s RETURNING 1),
     cnt AS (UPDATE orgcast.presence_count SET workers = workers - 1 WHERE organization_id = %(org)s
             AND user_id = %(user)s AND EXISTS (SELECT 1 FROM del) RETURNING workers)
SELECT workers FROM cnt
"""
_PRESENCE_FORGET = """
WITH del AS (DELETE FROM orgcast.presence WHERE worker = %(worker)s RETURNING organization_id, user_id),
     cnt AS (UPDATE orgcast.presence_count c SET workers = c.workers - 1 FROM del
             WHERE c.organization_id = del.organization_id AND c.user_id = del.user_id
             RETURNING c.organization_id, c.user_id, c.workers)
SELECT organization_id, user_id FROM cnt WHERE workers <= 0
"""
_TRIMMED = """
INSERT INTO orgcast.history_trimmed (room, through) SELECT room, max(id) FROM gone GROUP BY room
ON CONFLICT (room) DO UPDATE SET through = GREATEST(orgcast.history_trimmed.through, EXCLUDED.through)
RETURNING 1
"""


class PostgresBus(Bus):
    """LISTEN/NOTIFY between every worker of every instance sharing the database."""

    name = "postgres"

    def __init__(self, db: Database, dsn: str, *, carries_bus: bool = True,
                 source_channels: tuple[str, ...] = (), on_source: SourceHandler | None = None,
                 attachments_table: str | None = None, history: tuple[float, int] | None = None) -> None:
        super().__init__()
        #: (window seconds, events per room) when recovery keeps history here
        self._history = history if carries_bus else None
        self.recording = self._history is not None
        self._db = db
        self._dsn = dsn
        #: False when Redis carries the bus: this connection then only hears the sources
        self.carries_bus = carries_bus
        self._source_channels = source_channels
        self.on_source = on_source
        self._attachments_table = attachments_table
        self._conn: Any = None
        self._last_cleanup = 0.0
        self.parking = True
        if not carries_bus:
            self.name = "postgres-sources"

    # --- publishing

    def _publish(self, text: str) -> None:
        if len(text.encode()) < NOTIFY_LIMIT:
            self._db.fetch_one("SELECT pg_notify(%(channel)s, %(payload)s)",
                               {"channel": BUS_CHANNEL, "payload": text})
            return
        if not self.parking:
            raise Unavailable("the message is too large for NOTIFY and orgcast.bus_messages is missing")
        # One round trip: park the message and notify its id.
        self._db.fetch_one(
            "WITH parked AS (INSERT INTO orgcast.bus_messages (payload) VALUES (%(payload)s) RETURNING id) "
            "SELECT pg_notify(%(channel)s, json_build_object('v', 1, 'k', 'parked', 'id', id)::text) "
            "FROM parked", {"channel": BUS_CHANNEL, "payload": text})

    def _publish_recorded(self, publication: Publication) -> None:
        prefix, suffix = split_for_offset(publication)
        params = {"channel": BUS_CHANNEL, "args": publication.args, "except": list(publication.except_rooms),
                  "rooms": list(publication.rooms) or [""], "prefix": prefix, "suffix": suffix}
        if len(prefix.encode()) + len(suffix.encode()) + 20 < NOTIFY_LIMIT:
            sql = _RECORDED + "SELECT pg_notify(%(channel)s, %(prefix)s || s.id::text || %(suffix)s) FROM s"
        else:
            sql = _RECORDED + (
                ", p AS (INSERT INTO orgcast.bus_messages (payload) SELECT %(prefix)s || s.id::text || %(suffix)s "
                "FROM s RETURNING id) "
                "SELECT pg_notify(%(channel)s, json_build_object('v', 1, 'k', 'parked', 'id', id)::text) FROM p")
        self._db.fetch_one(sql, params)

    def history_since_many(self, queries: list[tuple[str, list[str]]]) -> list[Missed | None]:
        valid = [(int(o), r) for o, r in queries if o.isdigit() and len(o) <= 18]
        if not valid:
            return [None] * len(queries)
        # One statement for all: the bounds of every room asked about, the last id
        # given, and every event after the lowest offset in any of those rooms.
        rows = self._db.fetch_all(
            "SELECT 't', room, through, NULL::text, NULL::text[] FROM orgcast.history_trimmed "
            "WHERE room = ANY(%(rooms)s) "
            "UNION ALL SELECT 'l', NULL, last_value, NULL, NULL FROM orgcast.history_id "
            "UNION ALL SELECT 'e', room, id, args, except_rooms FROM orgcast.history "
            "WHERE room = ANY(%(rooms)s) AND id > %(low)s",
            {"rooms": sorted(set().union(*(r for _, r in valid))), "low": min(o for o, _ in valid)})
        trimmed: dict[str, int] = {}
        last = 0
        by_room: dict[str, list[tuple[int, str, tuple[str, ...]]]] = {}
        for kind, room, at, args, excepted in rows:
            if kind == "t":
                trimmed[room] = int(at)
            elif kind == "l":
                last = int(at)
            else:
                by_room.setdefault(room, []).append((int(at), args, tuple(excepted or ())))
        answers: list[Missed | None] = []
        for offset, rooms in queries:
            if not offset.isdigit() or len(offset) > 18:
                answers.append(None)
                continue
            after = int(offset)
            if max((trimmed.get(r, 0) for r in rooms), default=0) > after or after > last:
                answers.append(None)  # some of what followed is gone, or never given here
                continue
            seen: dict[int, tuple[str, str, tuple[str, ...]]] = {}
            for room in rooms:
                for at, args, excepted in by_room.get(room, ()):
                    if at > after:
                        seen.setdefault(at, (str(at), args, excepted))
            answers.append([seen[at] for at in sorted(seen)])
        return answers

    def history_head(self) -> str:
        row = self._db.fetch_one("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM orgcast.history_id", {})
        return str(row[0]) if row is not None else "0"

    def save_sessions(self, records: list[tuple[str, str]]) -> None:
        if records:
            self._db.fetch_one(
                "WITH saved AS (INSERT INTO orgcast.sessions (pid, record) "
                "SELECT * FROM unnest(%(pids)s::text[], %(records)s::text[]) "
                "ON CONFLICT (pid) DO UPDATE SET record = EXCLUDED.record, created_at = now() RETURNING 1) "
                "SELECT count(*) FROM saved", {"pids": [p for p, _ in records], "records": [r for _, r in records]})

    def take_sessions(self, pids: list[str]) -> list[str | None]:
        if self._history is None:
            return [None] * len(pids)
        rows = self._db.fetch_all(
            f"DELETE FROM orgcast.sessions WHERE pid = ANY(%(pids)s) AND created_at > now() - interval "
            f"'{float(self._history[0])} seconds' RETURNING pid, record", {"pids": list(set(pids))})
        kept = {str(pid): str(record) for pid, record in rows}
        return [kept.pop(pid, None) for pid in pids]

    def presence_join(self, organization_id: str, user_id: str, worker: str) -> bool:
        row = self._db.fetch_one(_PRESENCE_JOIN, {"org": organization_id, "user": user_id, "worker": worker})
        return row is not None and int(row[0]) == 1

    def presence_leave(self, organization_id: str, user_id: str, worker: str) -> bool:
        row = self._db.fetch_one(_PRESENCE_LEAVE, {"org": organization_id, "user": user_id, "worker": worker})
        return row is not None and int(row[0]) <= 0

    def presence_forget(self, worker: str) -> list[tuple[str, str]]:
        return [(str(o), str(u)) for o, u in self._db.fetch_all(_PRESENCE_FORGET, {"worker": worker})]

    def presence_workers(self) -> set[str]:
        return {str(w) for (w,) in self._db.fetch_all("SELECT DISTINCT worker FROM orgcast.presence", {})}

    def fetch_attachment(self, table: str, attachment_id: Any) -> bytes | None:
        """Return the payload of a ``@socket.io/postgres-emitter`` attachment, or None.

        :raise Unavailable: the database did not answer
        """
        row = self._db.fetch_one(f"SELECT payload FROM {_quote_table(table)} WHERE id = %(id)s",
                                 {"id": str(attachment_id)})
        return bytes(row[0]) if row is not None and row[0] is not None else None

    # --- listening

    def _listen(self) -> None:
        self._conn = conn = psycopg2.connect(self._dsn, application_name="orgcast-listen",
                                             connect_timeout=5, keepalives=1, keepalives_idle=10,
                                             keepalives_interval=5, keepalives_count=3)
        conn.autocommit = True
        if self.carries_bus:
            self._ensure_schema(conn)
            self._execute(conn, f'LISTEN "{BUS_CHANNEL}"')
        self.state = UP
        log.info("%s bus listening", self.name)
        next_leader_try = 0.0
        while True:
            now = time.monotonic()
            if not self.leader and self._source_channels and now >= next_leader_try:
                self._try_lead(conn)
                next_leader_try = now + LEADER_RETRY
            if self.leader and now - self._last_cleanup > CLEANUP_EVERY:
                self.cleanup()
            # A statement on this connection (the keepalive, the leader lock)
            # collects the notifications that arrived meanwhile: hand them on
            # now, not after the next wake-up.
            self._dispatch(conn)
            try:
                wait_read(conn.fileno(), timeout=KEEPALIVE if self.leader or not self._source_channels
                          else LEADER_RETRY)
            except TimeoutError:
                # Quiet: prove the connection is alive (a hung server never
                # answers: the timeout raises, and _run reconnects).
                with gevent.Timeout(KEEPALIVE, TimeoutError("no answer to a keepalive")):
                    self._execute(conn, "SELECT 1")
                continue
            conn.poll()
            self._dispatch(conn)

    def _dispatch(self, conn: Any) -> None:
        while conn.notifies:
            notify = conn.notifies.pop(0)
            if notify.channel == BUS_CHANNEL:
                self._bus_payload(notify.payload)
            elif self.on_source is not None:
                try:
                    self.on_source(notify.channel, notify.payload)
                except Exception:
                    self.dropped += 1
                    log.exception("handling a notification on %s failed", notify.channel)

    def _bus_payload(self, payload: str) -> None:
        if '"parked"' in payload[:64]:
            try:
                parked_id = int(json.loads(payload)["id"])
                row = self._db.fetch_one("SELECT payload FROM orgcast.bus_messages WHERE id = %(id)s",
                                         {"id": parked_id})
            except (ValueError, KeyError, TypeError, Unavailable) as exc:
                self.dropped += 1
                log.warning("could not read a parked bus message: %s", exc)
                return
            if row is None:
                self.dropped += 1
                log.warning("parked bus message %d is gone", parked_id)
                return
            payload = row[0]
        self._received(payload)

    def _try_lead(self, conn: Any) -> None:
        with gevent.Timeout(KEEPALIVE, TimeoutError("no answer to the leader lock")):
            with conn.cursor() as cur:
                cur.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_LOCK,))
                got = bool(cur.fetchone()[0])
        if got:
            for channel in self._source_channels:
                self._execute(conn, f"LISTEN {_quote_ident(channel)}")
            self.leader = True
            log.info("this worker is the leader: it hears %s", ", ".join(self._source_channels))

    def _ensure_schema(self, conn: Any) -> None:
        with conn.cursor() as cur:
            cur.execute("SELECT to_regclass(%s) IS NOT NULL", (SCHEMA_LAST,))
            if cur.fetchone()[0]:
                self.parking = True
                return
            try:
                conn.autocommit = False
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (LEADER_LOCK + 1,))
                cur.execute(SCHEMA_SQL)
                conn.commit()
                self.parking = True
                log.info("created orgcast's schema (bus messages over %d bytes, history, sessions)", NOTIFY_LIMIT)
            except psycopg2.Error as exc:
                conn.rollback()
                self.parking = False
                log.error("cannot create orgcast's schema (%s): bus messages over %d bytes and recovery will "
                          "fail; grant CREATE on the database or create it (README, \"The bus\")",
                          str(exc).strip().splitlines()[0], NOTIFY_LIMIT)
            finally:
                conn.autocommit = True

    def cleanup(self) -> None:
        """Delete what is past its time (the leader, every CLEANUP_EVERY seconds)."""
        self._last_cleanup = time.monotonic()
        try:
            if self.carries_bus and self.parking:
                self._db.fetch_one("WITH gone AS (DELETE FROM orgcast.bus_messages WHERE created_at < "
                                   f"now() - interval '{PARKED_FOR} seconds' RETURNING 1) SELECT count(*) FROM gone",
                                   {})
                self._db.fetch_one("WITH gone AS (DELETE FROM orgcast.presence_count WHERE workers <= 0 "
                                   "RETURNING 1) SELECT count(*) FROM gone", {})
            if self._history is not None:
                window, size = self._history
                self._db.fetch_one(
                    "WITH gone AS (DELETE FROM orgcast.history WHERE created_at < now() - interval "
                    f"'{float(window)} seconds' RETURNING room, id) " + _TRIMMED, {})
                self._db.fetch_one(
                    "WITH ranked AS (SELECT room, id, row_number() OVER (PARTITION BY room ORDER BY id DESC) AS n "
                    "FROM orgcast.history), gone AS (DELETE FROM orgcast.history h USING ranked r "
                    "WHERE h.room = r.room AND h.id = r.id AND r.n > %(size)s RETURNING h.room, h.id) " + _TRIMMED,
                    {"size": size})
                self._db.fetch_one(
                    "WITH gone AS (DELETE FROM orgcast.sessions WHERE created_at < now() - interval "
                    f"'{float(window)} seconds' RETURNING 1) SELECT count(*) FROM gone", {})
            if self._attachments_table and self._db.fetch_one(
                    "SELECT 1 WHERE to_regclass(%(table)s) IS NOT NULL", {"table": self._attachments_table}):
                # What the Node Postgres adapter did for its emitters' attachments.
                self._db.fetch_one(
                    f"WITH gone AS (DELETE FROM {_quote_table(self._attachments_table)} WHERE created_at < "
                    f"now() - interval '{ATTACHMENTS_FOR} seconds' RETURNING 1) SELECT count(*) FROM gone", {})
        except Unavailable as exc:
            log.debug("cleanup skipped: %s", exc.message)

    @staticmethod
    def _execute(conn: Any, sql: str) -> None:
        with conn.cursor() as cur:
            cur.execute(sql)

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except psycopg2.Error:
                pass  # already broken


def _quote_ident(name: str) -> str:
    """Quote a channel name for SQL (names come from settings, never from clients)."""
    return '"' + name.replace('"', '""') + '"'


def _quote_table(name: str) -> str:
    """Quote a table name, ``schema.table`` or ``table``."""
    return ".".join(_quote_ident(part) for part in name.split(".", 1))
