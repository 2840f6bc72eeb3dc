"""History, sessions and presence in orgcast's own schema of the application's Postgres.

The tables are created with the bus's schema (``postgres.SCHEMA_SQL``):
``orgcast.history`` (one row per room of each publication, by its log
position) and ``orgcast.history_trimmed`` (how far each room was trimmed,
so that a recovery that would miss events is refused),
``orgcast.socket_organizations`` (the organizations a socket subscribed
to, for its recovery), ``orgcast.secrets``, and the presence tables.
"""

from __future__ import annotations

import secrets as random_secrets

from app.bus.ports import Missed
from app.db import Database
from app.errors import Unavailable

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


class PostgresStore:
    """History, Sessions and PresenceStore (``bus/ports.py``) in Postgres."""

    def __init__(self, db: Database, window: float) -> None:
        self._db = db
        self._window = window

    # --- history

    def since_many(self, queries: list[tuple[int, int, list[str]]]) -> list[Missed | None]:
        if not queries:
            return []
        # One statement for all: the trimmed marks of every room asked about, the
        # head, and every row after the lowest position in any of those rooms.
        rows = self._db.fetch_all(
            "SELECT 't', room, through, NULL::text, NULL::text[] FROM orgcast.history_trimmed "
            "WHERE room = ANY(%(rooms)s) "
            "UNION ALL SELECT 'l', NULL, position, NULL, NULL FROM orgcast.log_head "
            "UNION ALL SELECT CASE WHEN created_at < now() - %(window)s * interval '1 second' THEN 'o' ELSE 'e' END, "
            "room, id, args, except_rooms FROM orgcast.history "
            "WHERE room = ANY(%(rooms)s) AND id > %(low)s AND id <= %(high)s",
            {"rooms": sorted(set().union(*(r for _, _, r in queries))), "low": min(a for a, _, _ in queries),
             "high": max(t for _, t, _ in queries), "window": self._window})
        trimmed: dict[str, int] = {}
        head = 0
        by_room: dict[str, list[tuple[int, str, tuple[str, ...]]]] = {}
        for kind, room, at, args, excepted in rows:
            if kind == "t":
                trimmed[room] = int(at)
            elif kind == "o":
                # Older than the window: whoever missed it was away too long (as if trimmed).
                trimmed[room] = max(trimmed.get(room, 0), int(at))
            elif kind == "l":
                head = int(at)
            else:
                by_room.setdefault(room, []).append((int(at), args, tuple(excepted or ())))
        return [_answer(after, through, rooms, head, trimmed, by_room) for after, through, rooms in queries]

    def latest(self, room: str, count: int, through: int) -> Missed:
        rows = self._db.fetch_all(
            "SELECT id, args, except_rooms FROM orgcast.history WHERE room = %(room)s AND id <= %(through)s "
            "ORDER BY id DESC LIMIT %(count)s", {"room": room, "through": through, "count": count})
        return [(int(at), args, tuple(excepted or ())) for at, args, excepted in reversed(rows)]

    # --- sessions

    def save_organizations(self, sid: str, organizations: list[str]) -> None:
        self._db.fetch_one(
            "INSERT INTO orgcast.socket_organizations VALUES (%(sid)s, %(orgs)s, now() + %(keep)s * interval "
            "'1 second') ON CONFLICT (sid) DO UPDATE SET organizations = EXCLUDED.organizations, "
            "kept_until = EXCLUDED.kept_until RETURNING 1",
            {"sid": sid, "orgs": organizations, "keep": 2 * self._window})

    def load_organizations(self, sids: list[str]) -> list[list[str] | None]:
        rows = self._db.fetch_all(
            "SELECT sid, organizations FROM orgcast.socket_organizations WHERE sid = ANY(%(sids)s) "
            "AND kept_until > now()", {"sids": sorted(set(sids))})
        kept = {str(sid): [str(o) for o in orgs] for sid, orgs in rows}
        return [kept.get(sid) for sid in sids]

    def keep_organizations(self, sids: list[str]) -> None:
        if sids:
            self._db.fetch_one(
                "WITH kept AS (UPDATE orgcast.socket_organizations SET kept_until = now() + %(keep)s * interval "
                "'1 second' WHERE sid = ANY(%(sids)s) RETURNING 1) SELECT count(*) FROM kept",
                {"sids": sids, "keep": 2 * self._window})

    def secret(self) -> bytes:
        # Two first connects at once: the second's INSERT waits for the first's row,
        # finds it, and inserts nothing, while its SELECT's snapshot is older than that
        # row: no row at all. The next statement's snapshot sees it.
        for _ in range(3):
            row = self._db.fetch_one(
                "WITH made AS (INSERT INTO orgcast.secrets VALUES ('recovery', %(value)s) ON CONFLICT DO NOTHING "
                "RETURNING value) SELECT value FROM made UNION ALL "
                "SELECT value FROM orgcast.secrets WHERE name = 'recovery' LIMIT 1",
                {"value": random_secrets.token_hex(32)})
            if row is not None:
                return bytes.fromhex(str(row[0]))
        raise Unavailable("the recovery secret could not be read")

    # --- presence

    def presence_join(self, organization_id: str, user_id: str, worker: str) -> bool:
        row = self._db.fetch_one(_PRESENCE_JOIN, {"org": organization_id, "user": user_id, "worker": worker})
        return row is not None and int(row[0]) == 1

    def presence_leave(self, organization_id: str, user_id: str, worker: str) -> bool:
        row = self._db.fetch_one(_PRESENCE_LEAVE, {"org": organization_id, "user": user_id, "worker": worker})
        return row is not None and int(row[0]) <= 0

    def presence_forget(self, worker: str) -> list[tuple[str, str]]:
        return [(str(o), str(u)) for o, u in self._db.fetch_all(_PRESENCE_FORGET, {"worker": worker})]

    def presence_pairs(self) -> set[tuple[str, str]]:
        return {(str(o), str(u)) for o, u in self._db.fetch_all(
            "SELECT organization_id, user_id FROM orgcast.presence_count WHERE workers > 0", {})}

    def presence_workers(self) -> set[str]:
        return {str(w) for (w,) in self._db.fetch_all("SELECT DISTINCT worker FROM orgcast.presence", {})}


def _answer(after: int, through: int, rooms: list[str], head: int, trimmed: dict[str, int],
            by_room: dict[str, list[tuple[int, str, tuple[str, ...]]]]) -> Missed | None:
    """One query's answer from the rows read for all of them."""
    if after < 0 or after > head or max((trimmed.get(r, 0) for r in rooms), default=0) > after:
        return None  # some of what followed is gone, or never given here
    seen: dict[int, tuple[int, str, tuple[str, ...]]] = {}
    for room in rooms:
        for at, args, excepted in by_room.get(room, ()):
            if after < at <= through:
                seen.setdefault(at, (at, args, excepted))
    return [seen[at] for at in sorted(seen)]
