"""The Postgres bus: the log is a table, NOTIFY its doorbell; one LISTEN connection per worker.

Appending is one statement: it takes the next position from
``orgcast.log_head`` (an ``UPDATE`` of its one row, whose lock every
append waits for until the one before commits — so positions follow commit
order, with no holes), inserts the entry into ``orgcast.log`` and each of
its rooms' rows into ``orgcast.history``, and notifies ``orgcast_log`` with
``"<position> <entry>"`` (the position alone for entries of 7,900 bytes or
more: NOTIFY refuses 8,000). A worker hands on an entry whose position
follows its cursor straight from the notification; any other (a jump, or
after a reconnect) makes it read the table from its cursor. Notifications
arrive in commit order, so the table never holds an entry before a
position a worker has already handed on.

Signals (heartbeats, questions) are plain NOTIFYs on ``orgcast_signals``;
large ones are parked in ``orgcast.bus_messages`` and their id notified.

The same connection takes part in electing the *leader*: the one process of
the deployment holding a session advisory lock, which listens to the
channels backends publish on (``orgcast`` for ``pg_notify``, and the
``@socket.io/postgres-emitter`` channel), hands each notification to the
source handler, and trims what is past its time. The lock goes with the
connection: when the leader dies, another worker takes it within
``LEADER_RETRY`` seconds.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import gevent
import psycopg2
import psycopg2.extensions
from gevent.socket import wait_read

from app.bus.envelope import Entry, Kick, Publication, Signal, encode
from app.bus.listener import CATCH_UP, LogListener
from app.db import Conflict, Database
from app.errors import Unavailable

log = logging.getLogger(__name__)

LOG_CHANNEL = "orgcast_log"
SIGNAL_CHANNEL = "orgcast_signals"
#: NOTIFY refuses payloads of 8,000 bytes or more
NOTIFY_LIMIT = 7900
#: a key of pg_advisory_lock for the leader (any constant shared by all instances)
LEADER_LOCK = 0x6F726763  # "orgc"
LEADER_RETRY = 1.0
#: seconds of silence after which the connection is checked with a query
KEEPALIVE = 5.0
#: seconds connect, schema and LISTEN may take together (libpq's connect_timeout does not apply under psycogreen)
CONNECT_TIMEOUT = 10.0
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
CREATE TABLE IF NOT EXISTS orgcast.log (
    position   bigint PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now(),
    message    text NOT NULL
);
CREATE INDEX IF NOT EXISTS log_created_at ON orgcast.log (created_at);
-- One row: the last position given, how far the log was trimmed, and its epoch.
-- (Positions go on from the history's old sequence, so an upgraded history keeps its ids.)
CREATE TABLE IF NOT EXISTS orgcast.log_head (
    one      boolean PRIMARY KEY DEFAULT true CHECK (one),
    position bigint NOT NULL,
    trimmed  bigint NOT NULL DEFAULT 0,
    epoch    text NOT NULL
);
INSERT INTO orgcast.log_head (position, epoch)
    SELECT last_value, replace(gen_random_uuid()::text, '-', '') FROM orgcast.history_id
    ON CONFLICT DO NOTHING;
CREATE TABLE IF NOT EXISTS orgcast.secrets (
    name  text PRIMARY KEY,
    value text NOT NULL
);
CREATE TABLE IF NOT EXISTS orgcast.socket_organizations (
    sid           text PRIMARY KEY,
    organizations text[] NOT NULL,
    kept_until    timestamptz NOT NULL
);
-- An Idempotency-Key is "<room> <key>" on its entry's row, kept (past the log's own
-- window) for ORGCAST_IDEMPOTENCY_WINDOW: one more index entry per keyed publish, where a
-- table of its own cost a row, two index entries and an ON CONFLICT (bench/README.md).
ALTER TABLE orgcast.log ADD COLUMN IF NOT EXISTS idem text;
CREATE UNIQUE INDEX IF NOT EXISTS log_idem ON orgcast.log (idem) WHERE idem IS NOT NULL;
"""
#: the newest object of SCHEMA_SQL: when it exists, the schema is complete
SCHEMA_LAST = "orgcast.log_idem"

_APPEND_REST = """
     l AS (INSERT INTO orgcast.log (position, message, idem) SELECT position, %(message)s, %(idem)s FROM p),
     h AS (INSERT INTO orgcast.history (room, id, args, except_rooms)
           SELECT r, p.position, %(args)s, %(except)s::text[] FROM p, unnest(%(rooms)s::text[]) AS r)
SELECT position, pg_notify(%(channel)s, position::text || %(notified)s) FROM p
"""
_APPEND = "WITH p AS (UPDATE orgcast.log_head SET position = position + 1 RETURNING position)," + _APPEND_REST
# A keyed append is the same statement: its key's unique index entry is the check. A
# second append with the key waits for the head's row lock, then fails on the index
# (rolled back: no position taken), and is answered as a repeat; a key past its window
# that the cleanup has not deleted yet is let go (``_RELEASE``) and the append tried again.
_RELEASE = """
WITH r AS (UPDATE orgcast.log SET idem = NULL WHERE idem = %(idem)s
           AND created_at < now() - %(window)s * interval '1 second' RETURNING 1)
SELECT count(*) FROM r
"""
_TRIMMED = """
INSERT INTO orgcast.history_trimmed (room, through) SELECT room, max(id) FROM gone GROUP BY room
ON CONFLICT (room) DO UPDATE SET through = GREATEST(orgcast.history_trimmed.through, EXCLUDED.through)
RETURNING 1
"""


class PostgresBus(LogListener):
    """The log, signals and leadership over the application's Postgres."""

    name = "postgres"

    def __init__(self, db: Database, dsn: str, *, window: float, history_size: int, carries_bus: bool = True,
                 source_channels: tuple[str, ...] = (), attachments_table: str | None = None,
                 idempotency_window: float = 300.0, signals_every: float = 2.0) -> None:
        super().__init__()
        #: seconds between the signals this process sends itself (the cluster's heartbeat)
        self._signals_every = signals_every
        self._up_at = 0.0
        self._deaf_warned = False
        self._idempotency_window = idempotency_window
        self._db = db
        self._dsn = dsn
        self._window = window
        self._history_size = history_size
        #: False when Redis carries the bus: this connection then only hears the sources
        self.carries_bus = carries_bus
        self._source_channels = source_channels
        self.on_source: Any = None
        self._attachments_table = attachments_table
        self._conn: Any = None
        self._last_cleanup = 0.0
        if not carries_bus:
            self.name = "postgres-sources"

    # --- the log

    def append(self, entry: Entry, key: str | None = None) -> int | None:
        text = encode(entry)
        rooms: list[str] = list(entry.rooms) if isinstance(entry, Publication) else []
        params = {
            "message": text, "channel": LOG_CHANNEL,
            "notified": " " + text if len(text.encode()) < NOTIFY_LIMIT - 24 else "",
            "rooms": rooms, "args": entry.args if isinstance(entry, Publication) else "",
            "except": list(entry.except_rooms) if isinstance(entry, Publication | Kick) else [],
            "idem": None if key is None else f"{rooms[0] if rooms else ''} {key}",
            "window": self._idempotency_window}
        for last_try in (False, True):
            try:
                row = self._db.fetch_one(_APPEND, params)
            except Conflict:
                # The key is on an entry already: within the window a repeat; past it, let go once.
                released = self._db.fetch_one(_RELEASE, params)
                if last_try or not (released and released[0]):
                    return None
                continue
            if row is None:
                raise Unavailable("orgcast's log is missing its head row")
            return int(row[0])
        return None

    def head(self) -> int:
        row = self._db.fetch_one("SELECT position FROM orgcast.log_head", {})
        return int(row[0]) if row is not None else 0

    # --- signals

    def signal(self, message: Signal) -> None:
        text = encode(message)
        if len(text.encode()) < NOTIFY_LIMIT:
            self._db.fetch_one("SELECT pg_notify(%(channel)s, %(payload)s)",
                               {"channel": SIGNAL_CHANNEL, "payload": text})
            return
        self._db.fetch_one(
            "WITH parked AS (INSERT INTO orgcast.bus_messages (payload) VALUES (%(payload)s) RETURNING id) "
            "SELECT pg_notify(%(channel)s, 'parked ' || id::text) FROM parked",
            {"channel": SIGNAL_CHANNEL, "payload": text})

    def fetch_attachment(self, table: str, attachment_id: Any) -> bytes | None:
        """Return the payload of a ``@socket.io/postgres-emitter`` attachment, or None.

        :raise Unavailable: the database did not answer
        """
        row = self._db.fetch_one(f"SELECT payload FROM {_quote_table(table)} WHERE id = %(id)s",
                                 {"id": str(attachment_id)})
        return bytes(row[0]) if row is not None and row[0] is not None else None

    # --- listening

    def _listen(self) -> None:
        with gevent.Timeout(CONNECT_TIMEOUT, TimeoutError("connecting took too long")):
            self._conn = conn = psycopg2.connect(self._dsn, application_name="orgcast-listen",
                                                 connect_timeout=5, keepalives=1, keepalives_idle=10,
                                                 keepalives_interval=5, keepalives_count=3)
            conn.autocommit = True
            if self.carries_bus:
                self._ensure_schema(conn)
                self._execute(conn, f'LISTEN "{LOG_CHANNEL}"; LISTEN "{SIGNAL_CHANNEL}"')
                self._catch_up(conn)
        self._up()
        self._up_at = time.monotonic()
        next_leader_try = 0.0
        while True:
            now = time.monotonic()
            if not self.leader and self._source_channels and now >= next_leader_try:
                self._try_lead(conn)
                next_leader_try = now + LEADER_RETRY
            if self.leader and now - self._last_cleanup > CLEANUP_EVERY:
                self.cleanup()
            # A statement on this connection (the keepalive, the leader lock, a
            # catch-up) collects the notifications that arrived meanwhile: hand
            # them on now, not after the next wake-up.
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

    def _catch_up(self, conn: Any) -> None:
        """Read the log from the cursor to its end (after a reconnect, or a jump in positions)."""
        with conn.cursor() as cur:
            cur.execute("SELECT position, trimmed, epoch FROM orgcast.log_head")
            head, trimmed, epoch = cur.fetchone()
        after = self._resumed(str(epoch), int(head), int(trimmed))
        while True:
            with gevent.Timeout(KEEPALIVE, TimeoutError("no answer to a catch-up read")):
                with conn.cursor() as cur:
                    cur.execute("SELECT position, message FROM orgcast.log WHERE position > %s ORDER BY position "
                                "LIMIT %s", (after, CATCH_UP))
                    rows = cur.fetchall()
            for position, message in rows:
                self._entry(int(position), message)
                after = int(position)
            if len(rows) < CATCH_UP:
                return

    def _dispatch(self, conn: Any) -> None:
        while conn.notifies:
            notify = conn.notifies.pop(0)
            if notify.channel == LOG_CHANNEL:
                self._doorbell(conn, notify.payload)
            elif notify.channel == SIGNAL_CHANNEL:
                self._signal_payload(notify.payload)
            elif self.on_source is not None:
                try:
                    self.on_source(notify.channel, notify.payload)
                except Exception:
                    self.dropped += 1
                    log.exception("handling a notification on %s failed", notify.channel)

    def _doorbell(self, conn: Any, payload: str) -> None:
        number, _, text = payload.partition(" ")
        try:
            position = int(number)
        except ValueError:
            self.dropped += 1
            log.warning("dropped a notification on %s that is not a position", LOG_CHANNEL)
            return
        cursor = self.cursor or 0
        if position <= cursor:
            return  # read already (the catch-up after a reconnect overlaps the notifications)
        if position == cursor + 1 and text:
            self._entry(position, text)
        else:
            self._catch_up(conn)  # a large entry, or one missed

    def probe(self) -> float:
        """Readiness: connected, and hearing what is notified (its own heartbeats come back).

        Through PgBouncer in transaction pooling, LISTEN is accepted and then
        silently useless (the server connection goes back to the pool): the
        heartbeats this worker NOTIFYs never come back. Say so, rather than
        lose every event without a word (issue 22).

        :raise Unavailable: the bus is not connected, or deaf
        """
        super().probe()
        if self.carries_bus and self.state == "up":
            heard = max(self.last_message_at_monotonic, self._up_at)
            silent = time.monotonic() - heard
            if heard and silent > 5 * self._signals_every + 5:
                if not self._deaf_warned:
                    self._deaf_warned = True
                    log.error("the LISTEN connection hears nothing of what this worker notifies (%.0f s): through "
                              "PgBouncer in transaction pooling? set ORGCAST_LISTEN_DATABASE_URL to a direct "
                              "connection", silent)
                raise Unavailable("notifications do not come back on the LISTEN connection (through PgBouncer in "
                                  "transaction pooling? set ORGCAST_LISTEN_DATABASE_URL)")
            self._deaf_warned = False
        return 0.0

    def _signal_payload(self, payload: str) -> None:
        if payload.startswith("parked "):
            try:
                row = self._db.fetch_one("SELECT payload FROM orgcast.bus_messages WHERE id = %(id)s",
                                         {"id": int(payload[7:])})
            except (ValueError, Unavailable) as exc:
                self.dropped += 1
                log.warning("could not read a parked signal: %s", exc)
                return
            if row is None:
                self.dropped += 1
                return
            payload = row[0]
        self._signal(payload)

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
                return
            try:
                conn.autocommit = False
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (LEADER_LOCK + 1,))
                cur.execute(SCHEMA_SQL)
                conn.commit()
                log.info("created orgcast's schema (the log, history, sessions)")
            except psycopg2.Error as exc:
                conn.rollback()
                log.error("cannot create orgcast's schema (%s): grant CREATE on the database or create it "
                          "(README, \"The bus\")", str(exc).strip().splitlines()[0])
                raise
            finally:
                conn.autocommit = True

    def cleanup(self) -> None:
        """Delete what is past its time (the leader, every CLEANUP_EVERY seconds)."""
        self._last_cleanup = time.monotonic()
        window = float(max(self._window, 60.0))
        try:
            if self.carries_bus:
                self._db.fetch_one(
                    "WITH gone AS (DELETE FROM orgcast.log WHERE created_at < now() - interval "
                    f"'{window} seconds' AND (idem IS NULL OR created_at < now() - %(keys)s * interval '1 second') "
                    "RETURNING position) "
                    "UPDATE orgcast.log_head SET trimmed = GREATEST(trimmed, (SELECT max(position) FROM gone)) "
                    "WHERE EXISTS (SELECT 1 FROM gone) RETURNING 1", {"keys": self._idempotency_window})
                self._db.fetch_one("WITH gone AS (DELETE FROM orgcast.bus_messages WHERE created_at < "
                                   f"now() - interval '{PARKED_FOR} seconds' RETURNING 1) SELECT count(*) FROM gone",
                                   {})
                self._db.fetch_one("WITH gone AS (DELETE FROM orgcast.presence_count WHERE workers <= 0 "
                                   "RETURNING 1) SELECT count(*) FROM gone", {})
                self._db.fetch_one("WITH gone AS (DELETE FROM orgcast.socket_organizations WHERE kept_until < "
                                   "now() RETURNING 1) SELECT count(*) FROM gone", {})
                self._db.fetch_one(
                    "WITH gone AS (DELETE FROM orgcast.history WHERE created_at < now() - interval "
                    f"'{float(self._window)} seconds' RETURNING room, id) " + _TRIMMED, {})
                self._db.fetch_one(
                    "WITH ranked AS (SELECT room, id, row_number() OVER (PARTITION BY room ORDER BY id DESC) AS n "
                    "FROM orgcast.history), gone AS (DELETE FROM orgcast.history h USING ranked r "
                    "WHERE h.room = r.room AND h.id = r.id AND r.n > %(size)s RETURNING h.room, h.id) " + _TRIMMED,
                    {"size": self._history_size})
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
