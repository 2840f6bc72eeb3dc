"""The Redis bus: PUBLISH to publish, one pub/sub connection per worker to hear.

redis-py's sockets are cooperative under gevent (gunicorn's worker patches
the standard library before the app is imported).

The same connection, in the one process of the deployment that holds
``<prefix>:emitter-leader`` (a key with a short expiry that its holder
renews), also pattern-subscribes to the channels of the Socket.IO Redis
emitters (``<prefix>#*``, ``<prefix>-request#*``) and hands each message to
the source handler. When the leader dies its key expires and another worker
takes it within ``LOCK_TTL`` seconds.

With recovery on, a Lua script keeps each publication in one stream per
room (``orgcast:history:<room>``, trimmed by count and by age, expiring
when idle) under an ID it assigns from Redis's clock — the same for every
room, increasing across all of them — and publishes it with that ID as its
offset, in one round trip. Disconnected sessions wait in keys that expire
with the recovery window.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from collections.abc import Callable
from typing import Any

import redis

from app.bus.base import UP, Bus, Missed, SourceHandler
from app.bus.envelope import Publication, split_for_offset
from app.errors import Unavailable

log = logging.getLogger(__name__)

BUS_CHANNEL = "orgcast:bus"
LOCK_TTL = 3.0
LOCK_RENEW = 1.0
_RENEW = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
          "return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end")
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"
HISTORY_PREFIX = "orgcast:history:"
#: how far each room's stream was trimmed (Redis's own max-deleted-entry-id
#: only follows XDEL, not trimming)
TRIMMED_PREFIX = "orgcast:history-trimmed:"
SESSION_PREFIX = "orgcast:session:"
#: presence (ORGCAST_PRESENCE_EVENTS): a set of workers per "<organization>:<user>" (organization
#: ids hold no ":"), and a set of those pairs per worker
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
# KEYS: the last-id key, then per room its stream and its trimmed mark. ARGV:
# window ms, events per room, args, except rooms (JSON), channel, envelope
# prefix, envelope suffix. Trimming is done here, not by XADD's MAXLEN, to
# know the newest ID it removes.
_RECORD = """
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local seq = 0
local last = redis.call('GET', KEYS[1])
if last then
  local lms, lseq = string.match(last, '^(%d+)-(%d+)$')
  lms = tonumber(lms)
  if ms <= lms then ms = lms; seq = tonumber(lseq) + 1 end
end
local id = ms .. '-' .. seq
redis.call('SET', KEYS[1], id)
local size = tonumber(ARGV[2])
local oldest = (ms - tonumber(ARGV[1])) .. '-0'
for i = 2, #KEYS, 2 do
  redis.call('XADD', KEYS[i], id, 'a', ARGV[3], 'x', ARGV[4])
  local gone = nil
  local over = redis.call('XLEN', KEYS[i]) - size
  if over > 0 then gone = redis.call('XRANGE', KEYS[i], '-', '+', 'COUNT', over)[over][1] end
  local old = redis.call('XREVRANGE', KEYS[i], '(' .. oldest, '-', 'COUNT', 1)[1]
  if old then
    local oms, oseq = string.match(old[1], '^(%d+)-(%d+)$')
    local gms, gseq = 0, 0
    if gone then gms, gseq = string.match(gone, '^(%d+)-(%d+)$') end
    if tonumber(oms) > tonumber(gms) or (tonumber(oms) == tonumber(gms) and tonumber(oseq) > tonumber(gseq)) then
      gone = old[1]
    end
  end
  if gone then
    local gms, gseq = string.match(gone, '^(%d+)-(%d+)$')
    redis.call('XTRIM', KEYS[i], 'MINID', gms .. '-' .. (tonumber(gseq) + 1))
    redis.call('SET', KEYS[i + 1], gone, 'PX', 2 * tonumber(ARGV[1]))
  else
    redis.call('PEXPIRE', KEYS[i + 1], 2 * tonumber(ARGV[1]))
  end
  -- idle twice the window: no client that may still be recovered missed any of it
  redis.call('PEXPIRE', KEYS[i], 2 * tonumber(ARGV[1]))
end
redis.call('PUBLISH', ARGV[5], ARGV[6] .. id .. ARGV[7])
return id
"""


_STREAM_ID = re.compile(r"\d{1,20}-\d{1,20}")


def _id_key(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def _missed(offset: str, last: tuple[int, int], answers: list[Any]) -> Missed | None:
    """One query's answer from its (trimmed, entries) pairs of replies."""
    if _id_key(offset) > last:
        return None  # never given here (another Redis?)
    events: dict[tuple[int, int], tuple[str, str, tuple[str, ...]]] = {}
    for trimmed, entries in zip(answers[0::2], answers[1::2], strict=True):
        if trimmed and _id_key(trimmed.decode()) > _id_key(offset):
            return None  # some of what followed the offset was trimmed
        for entry_id, fields in entries:
            key = entry_id.decode()
            events[_id_key(key)] = (key, fields[b"a"].decode(), tuple(json.loads(fields.get(b"x", b"[]"))))
    return [events[k] for k in sorted(events)]


class RedisBus(Bus):
    """Redis pub/sub between every worker of every instance sharing the Redis."""

    name = "redis"

    def __init__(self, url: str, *, timeout: float, emitter_prefix: str, connections: int = 10,
                 on_source: SourceHandler | None = None, history: tuple[float, int] | None = None) -> None:
        super().__init__()
        #: (window seconds, events per room) when recovery keeps history here
        self._history = history
        self.recording = history is not None
        self._url = url
        self._timeout = timeout
        self._client = bounded_client(url, timeout, connections)
        self._patterns = (f"{emitter_prefix}#*", f"{emitter_prefix}-request#*")
        self._lock_key = f"{emitter_prefix}:orgcast:emitter-leader"
        self._token = secrets.token_hex(8)
        self.on_source = on_source
        self._pubsub: Any = None
        self._record = self._client.register_script(_RECORD)
        self._presence_join = self._client.register_script(_PRESENCE_JOIN)
        self._presence_leave = self._client.register_script(_PRESENCE_LEAVE)
        self._presence_forget = self._client.register_script(_PRESENCE_FORGET)

    def _publish(self, text: str) -> None:
        try:
            self._client.publish(BUS_CHANNEL, text)
        except (redis.RedisError, OSError) as exc:
            log.warning("redis publish failed: %s", type(exc).__name__)
            raise Unavailable("redis did not take the message; retry") from None

    def _publish_recorded(self, publication: Publication) -> None:
        assert self._history is not None
        window, size = self._history
        prefix, suffix = split_for_offset(publication)
        keys = [HISTORY_PREFIX + "last"]
        for room in publication.rooms or ("",):
            keys += (HISTORY_PREFIX + room, TRIMMED_PREFIX + room)
        try:
            self._record(keys=keys, args=[int(window * 1000), size, publication.args,
                                          json.dumps(list(publication.except_rooms)), BUS_CHANNEL, prefix, suffix])
        except (redis.RedisError, OSError) as exc:
            log.warning("redis publish failed: %s", type(exc).__name__)
            raise Unavailable("redis did not take the message; retry") from None

    def history_since_many(self, queries: list[tuple[str, list[str]]]) -> list[Missed | None]:
        if self._history is None:
            return [None] * len(queries)
        valid = [(offset, rooms) for offset, rooms in queries if _STREAM_ID.fullmatch(offset)]
        if not valid:
            return [None] * len(queries)
        size = self._history[1]
        try:  # one pipeline for all: each query's commands, after the last id given
            pipe = self._client.pipeline(transaction=False)
            pipe.get(HISTORY_PREFIX + "last")
            for offset, rooms in valid:
                for room in rooms:
                    pipe.get(TRIMMED_PREFIX + room)
                    pipe.xrange(HISTORY_PREFIX + room, min="(" + offset, count=size + 1)
            answers = pipe.execute(raise_on_error=False)
        except (redis.RedisError, OSError) as exc:
            raise Unavailable(f"redis did not answer ({type(exc).__name__})") from None
        if any(isinstance(a, Exception) for a in answers):
            raise Unavailable("redis did not answer the history")
        last = _id_key(answers[0].decode() if answers[0] else "0-0")
        at = 1
        found: dict[tuple[str, tuple[str, ...]], Missed | None] = {}
        for offset, rooms in valid:
            mine = answers[at:at + 2 * len(rooms)]
            at += 2 * len(rooms)
            found[(offset, tuple(rooms))] = _missed(offset, last, mine)
        return [found.get((offset, tuple(rooms))) for offset, rooms in queries]

    def history_head(self) -> str:
        try:
            last = self._client.get(HISTORY_PREFIX + "last")
        except (redis.RedisError, OSError) as exc:
            raise Unavailable(f"redis did not answer ({type(exc).__name__})") from None
        return last.decode() if isinstance(last, bytes) else "0-0"

    def presence_join(self, organization_id: str, user_id: str, worker: str) -> bool:
        return self._presence_change(self._presence_join, organization_id, user_id, worker)

    def presence_leave(self, organization_id: str, user_id: str, worker: str) -> bool:
        return self._presence_change(self._presence_leave, organization_id, user_id, worker)

    def _presence_change(self, script: Any, organization_id: str, user_id: str, worker: str) -> bool:
        pair = f"{organization_id}:{user_id}"
        try:
            return bool(script(keys=[PRESENCE_PREFIX + pair, PRESENCE_WORKER_PREFIX + worker], args=[worker, pair]))
        except (redis.RedisError, OSError) as exc:
            raise Unavailable(f"redis did not answer ({type(exc).__name__})") from None

    def presence_forget(self, worker: str) -> list[tuple[str, str]]:
        try:
            gone = self._presence_forget(keys=[PRESENCE_WORKER_PREFIX + worker], args=[worker, PRESENCE_PREFIX])
        except (redis.RedisError, OSError) as exc:
            raise Unavailable(f"redis did not answer ({type(exc).__name__})") from None
        pairs = [(p.decode() if isinstance(p, bytes) else str(p)).partition(":") for p in gone or []]
        return [(organization_id, user_id) for organization_id, _, user_id in pairs]

    def presence_workers(self) -> set[str]:
        try:
            keys = list(self._client.scan_iter(match=PRESENCE_WORKER_PREFIX + "*", count=1000))
        except (redis.RedisError, OSError) as exc:
            raise Unavailable(f"redis did not answer ({type(exc).__name__})") from None
        return {(k.decode() if isinstance(k, bytes) else str(k))[len(PRESENCE_WORKER_PREFIX):] for k in keys}

    def save_sessions(self, records: list[tuple[str, str]]) -> None:
        if not records or self._history is None:
            return
        ttl = max(1, int(self._history[0]))
        try:
            pipe = self._client.pipeline(transaction=False)
            for pid, record in records:
                pipe.set(SESSION_PREFIX + pid, record, ex=ttl)
            pipe.execute()
        except (redis.RedisError, OSError) as exc:
            raise Unavailable(f"redis did not answer ({type(exc).__name__})") from None

    def take_sessions(self, pids: list[str]) -> list[str | None]:
        if self._history is None:
            return [None] * len(pids)
        try:
            pipe = self._client.pipeline(transaction=False)
            for pid in pids:
                pipe.getdel(SESSION_PREFIX + pid)
            records = pipe.execute()
        except (redis.RedisError, OSError) as exc:
            raise Unavailable(f"redis did not answer ({type(exc).__name__})") from None
        return [r.decode() if isinstance(r, bytes) else None for r in records]

    def _listen(self) -> None:
        listener = redis.Redis.from_url(self._url, socket_timeout=None, socket_connect_timeout=self._timeout,
                                        health_check_interval=5)
        self._pubsub = pubsub = listener.pubsub()  # type: ignore[no-untyped-call]
        pubsub.subscribe(BUS_CHANNEL)
        # The subscription is only sure once Redis confirms it.
        confirmed = pubsub.get_message(timeout=self._timeout)
        if not confirmed or confirmed.get("type") != "subscribe":
            raise ConnectionError("redis did not confirm the subscription")
        self.state = UP
        log.info("redis bus listening")
        next_renew = 0.0
        while True:
            now = time.monotonic()
            if self.on_source is not None and now >= next_renew:
                self._lead(pubsub)
                next_renew = now + LOCK_RENEW
            message = pubsub.get_message(timeout=LOCK_RENEW)
            if message is None:
                continue
            if message["type"] == "message" and message["channel"] == BUS_CHANNEL.encode():
                self._received(message["data"])
            elif message["type"] == "pmessage" and self.leader and self.on_source is not None:
                channel = message["channel"].decode("utf-8", "replace")
                try:
                    self.on_source(channel, message["data"])
                except Exception:
                    self.dropped += 1
                    log.exception("handling a message on %s failed", channel[:80])

    def _lead(self, pubsub: Any) -> None:
        ttl = int(LOCK_TTL * 1000)
        if self.leader:
            if self._client.eval(_RENEW, 1, self._lock_key, self._token, ttl):
                return
            log.warning("lost the emitter leadership")
            pubsub.punsubscribe(*self._patterns)
            self.leader = False
        if self._client.set(self._lock_key, self._token, nx=True, px=ttl):
            pubsub.psubscribe(*self._patterns)
            self.leader = True
            log.info("this worker is the leader: it hears %s", ", ".join(self._patterns))

    def stop(self) -> None:
        super().stop()
        self._client.connection_pool.disconnect()  # (it would open new ones if asked again)

    def _close(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            try:
                pubsub.close()
            except (redis.RedisError, OSError):
                pass  # already broken
        if self.leader:
            try:
                self._client.eval(_RELEASE, 1, self._lock_key, self._token)
            except (redis.RedisError, OSError):
                pass  # it expires by itself
            self.leader = False


def bounded_client(url: str, timeout: float, connections: int) -> redis.Redis:
    """A client of at most ``connections`` connections, waiting up to ``timeout`` for one.

    Bounded like the database's pool: in a reconnect storm thousands of
    greenlets ask at once, and redis-py's default pool would open one
    connection to Redis for each of them.
    """
    pool = redis.BlockingConnectionPool.from_url(url, max_connections=connections, timeout=timeout,
                                                 socket_timeout=timeout, socket_connect_timeout=timeout)
    return redis.Redis(connection_pool=pool)


def make_redis_probe(url: str, timeout: float) -> Callable[[], float]:
    """Return a readiness probe that pings Redis and returns the latency in ms.

    :raise Unavailable: (from the probe) Redis did not answer in time
    """
    client = bounded_client(url, timeout, 2)

    def probe() -> float:
        started = time.monotonic()
        try:
            client.ping()
        except (redis.RedisError, OSError) as exc:
            log.warning("redis error: %s", type(exc).__name__)
            raise Unavailable("redis did not answer") from None
        return (time.monotonic() - started) * 1000.0

    return probe
