"""History, sessions and presence in Redis (with ``REDIS_URL``).

- history: each room's stream ``orgcast:history:<room>`` (written by the
  log's append script, same IDs as the log) and its trimmed mark;
- sessions: ``orgcast:organizations:<sid>`` (a socket's organizations, for
  its recovery) and ``orgcast:secret``;
- presence: a set of workers per ``<organization>:<user>`` (organization
  ids hold no ":"), and a set of those pairs per worker.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from app.bus.ports import Missed
from app.bus.redis import HISTORY_PREFIX, HISTORY_TRIMMED_PREFIX, LOG_KEY, TRIMMED_KEY, answered, position_of, stream_id
from app.errors import Unavailable

ORGANIZATIONS_PREFIX = "orgcast:organizations:"
SECRET_KEY = "orgcast:secret"
PRESENCE_PREFIX = "orgcast:presence:"
PRESENCE_WORKER_PREFIX = "orgcast:presence-worker:"
# KEYS: the pair's set, the worker's set. ARGV: worker, pair. 1: the first worker.
_PRESENCE_JOIN = """
if redis.call('SADD', KEYS[1], ARGV[1]) == 1 then
  redis.call('SADD', KEYS[2], ARGV[2])
  if redis.call('SCARD', KEYS[1]) == 1 then return 1 end
end
return 0
"""
# The same KEYS and ARGV. 1: no worker any more.
_PRESENCE_LEAVE = """
if redis.call('SREM', KEYS[1], ARGV[1]) == 1 then
  redis.call('SREM', KEYS[2], ARGV[2])
  if redis.call('SCARD', KEYS[1]) == 0 then return 1 end
end
return 0
"""
# KEYS: the worker's set. ARGV: worker, the pairs' key prefix. The pairs no worker holds now.
_PRESENCE_FORGET = """
local gone = {}
for _, pair in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = ARGV[2] .. pair
  redis.call('SREM', key, ARGV[1])
  if redis.call('SCARD', key) == 0 then table.insert(gone, pair) end
end
redis.call('DEL', KEYS[1])
return gone
"""


class RedisStore:
    """History, Sessions and PresenceStore (``bus/ports.py``) in Redis."""

    def __init__(self, client: Any, window: float, history_size: int) -> None:
        self._client = client
        self._window = window
        self._size = history_size
        self._presence_join = client.register_script(_PRESENCE_JOIN)
        self._presence_leave = client.register_script(_PRESENCE_LEAVE)
        self._presence_forget = client.register_script(_PRESENCE_FORGET)

    # --- history

    def since_many(self, queries: list[tuple[int, int, list[str]]]) -> list[Missed | None]:
        if not queries:
            return []
        with answered("the history"):  # one pipeline for all: each query's commands, after the log's head
            pipe = self._client.pipeline(transaction=False)
            pipe.xrevrange(LOG_KEY, count=1)
            pipe.get(TRIMMED_KEY)
            for after, through, rooms in queries:
                for room in rooms:
                    pipe.get(HISTORY_TRIMMED_PREFIX + room)
                    pipe.get(HISTORY_TRIMMED_PREFIX + room + ":last")
                    pipe.exists(HISTORY_PREFIX + room)
                    pipe.xrange(HISTORY_PREFIX + room, min="(" + stream_id(max(after, 0)),
                                max=stream_id(max(through, 0)), count=self._size + 1)
            answers = pipe.execute(raise_on_error=False)
        if any(isinstance(a, Exception) for a in answers):
            raise Unavailable("redis did not answer the history")
        head = max(position_of(answers[0][0][0]) if answers[0] else 0,
                   position_of(answers[1]) if answers[1] else 0)
        at = 2
        found: list[Missed | None] = []
        oldest = int((time.time() - self._window) * 1000) * 1_000_000
        for after, _, rooms in queries:
            mine = answers[at:at + 4 * len(rooms)]
            at += 4 * len(rooms)
            missed = _missed(after, head, mine)
            # Something older than the window: whoever missed it was away too long.
            found.append(None if missed and missed[0][0] < oldest else missed)
        return found

    def latest(self, room: str, count: int, through: int) -> Missed:
        with answered("the history"):
            entries = self._client.xrevrange(HISTORY_PREFIX + room, max=stream_id(max(through, 0)), count=count)
        return [(position_of(entry_id), fields[b"a"].decode(), tuple(json.loads(fields.get(b"x", b"[]"))))
                for entry_id, fields in reversed(entries)]

    # --- sessions

    def save_organizations(self, sid: str, organizations: list[str]) -> None:
        with answered("the session"):
            self._client.set(ORGANIZATIONS_PREFIX + sid, json.dumps(organizations), ex=max(1, int(2 * self._window)))

    def load_organizations(self, sids: list[str]) -> list[list[str] | None]:
        if not sids:
            return []
        with answered("the sessions"):
            values = self._client.mget([ORGANIZATIONS_PREFIX + sid for sid in sids])
        return [[str(o) for o in json.loads(v)] if v else None for v in values]

    def keep_organizations(self, sids: list[str]) -> None:
        if sids:
            with answered("the sessions"):
                pipe = self._client.pipeline(transaction=False)
                for sid in sids:
                    pipe.expire(ORGANIZATIONS_PREFIX + sid, max(1, int(2 * self._window)))
                pipe.execute()

    def secret(self) -> bytes:
        with answered("the secret"):
            self._client.set(SECRET_KEY, secrets.token_hex(32), nx=True)
            value = self._client.get(SECRET_KEY)
        return bytes.fromhex(value.decode())

    # --- presence

    def presence_join(self, organization_id: str, user_id: str, worker: str) -> bool:
        return self._presence_change(self._presence_join, organization_id, user_id, worker)

    def presence_leave(self, organization_id: str, user_id: str, worker: str) -> bool:
        return self._presence_change(self._presence_leave, organization_id, user_id, worker)

    def _presence_change(self, script: Any, organization_id: str, user_id: str, worker: str) -> bool:
        pair = f"{organization_id}:{user_id}"
        with answered("presence"):
            return bool(script(keys=[PRESENCE_PREFIX + pair, PRESENCE_WORKER_PREFIX + worker], args=[worker, pair]))

    def presence_forget(self, worker: str) -> list[tuple[str, str]]:
        with answered("presence"):
            gone = self._presence_forget(keys=[PRESENCE_WORKER_PREFIX + worker], args=[worker, PRESENCE_PREFIX])
        pairs = [(p.decode() if isinstance(p, bytes) else str(p)).partition(":") for p in gone or []]
        return [(organization_id, user_id) for organization_id, _, user_id in pairs]

    def presence_pairs(self) -> set[tuple[str, str]]:
        with answered("presence"):
            keys = list(self._client.scan_iter(match=PRESENCE_PREFIX + "*", count=1000))
        pairs = [(k.decode() if isinstance(k, bytes) else str(k))[len(PRESENCE_PREFIX):].partition(":") for k in keys]
        return {(organization_id, user_id) for organization_id, _, user_id in pairs}

    def presence_workers(self) -> set[str]:
        with answered("presence"):
            keys = list(self._client.scan_iter(match=PRESENCE_WORKER_PREFIX + "*", count=1000))
        return {(k.decode() if isinstance(k, bytes) else str(k))[len(PRESENCE_WORKER_PREFIX):] for k in keys}


def _missed(after: int, head: int, answers: list[Any]) -> Missed | None:
    """One query's answer from its (trimmed mark, last ID, stream exists, entries) replies per room."""
    if after < 0 or after > head:
        return None  # never given here
    events: dict[int, tuple[int, str, tuple[str, ...]]] = {}
    for trimmed, last, exists, entries in zip(answers[0::4], answers[1::4], answers[2::4], answers[3::4],
                                              strict=True):
        if trimmed and position_of(trimmed) > after:
            return None  # some of what followed was trimmed
        if last and position_of(last) > after and not exists:
            return None  # the room's stream went idle and expired with what followed
        for entry_id, fields in entries:
            at = position_of(entry_id)
            events[at] = (at, fields[b"a"].decode(), tuple(json.loads(fields.get(b"x", b"[]"))))
    return [events[k] for k in sorted(events)]
