"""The Redis bus: the log is a stream, read by each worker with a blocking XREAD from its cursor.

redis-py's sockets are cooperative under gevent (gunicorn's worker patches
the standard library before the app is imported).

Appending is one script (``_APPEND``): ``XADD orgcast:log *`` gives the
entry its ID from Redis's clock (always above the last one), the same ID
goes into each room's history stream (``orgcast:history:<room>``, trimmed
by count and age), and the log's *epoch* (``orgcast:epoch``) is made if it
is missing. A position is the ID as one integer, ``ms * 1,000,000 + seq``.

A Redis that comes back without its data has no epoch key: the first
worker or publisher to see it makes a new one, and every worker then knows
that what its cursor had not reached is gone (``listener.LogListener``).

Each worker also holds one pub/sub connection (``RedisSignals``) for the
signals (``orgcast:signals``) and, in the one process of the deployment
holding ``<prefix>:orgcast:emitter-leader`` (a key with a short expiry that
its holder renews), the channels of the Socket.IO Redis emitters
(``<prefix>#*``, ``<prefix>-request#*``), handed to the source handler.
The leader also trims the log to the window. When it dies its key expires
and another worker takes it within ``LOCK_TTL`` seconds.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import redis

from app.bus.envelope import Entry, Publication, Signal, encode
from app.bus.listener import CATCH_UP, Listener, LogListener
from app.errors import Unavailable

log = logging.getLogger(__name__)

LOG_KEY = "orgcast:log"
EPOCH_KEY = "orgcast:epoch"
TRIMMED_KEY = "orgcast:log-trimmed"
SIGNAL_CHANNEL = "orgcast:signals"
HISTORY_PREFIX = "orgcast:history:"
IDEMPOTENCY_PREFIX = "orgcast:idempotency:"
#: how far each room's stream was trimmed (Redis's own max-deleted-entry-id only follows XDEL)
HISTORY_TRIMMED_PREFIX = "orgcast:history-trimmed:"
LOCK_TTL = 3.0
LOCK_RENEW = 1.0
#: milliseconds an XREAD blocks before the reader checks its connection
BLOCK_MS = 5000
CLEANUP_EVERY = 10.0
_RENEW = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
          "return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end")
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"
# KEYS: the log, the epoch, then per room its history stream and trimmed mark.
# ARGV: the entry, window ms, events per room, args, except rooms (JSON), the idempotency
# key's key (or ''), its window ms. (The key's key is an ARGV, as a single Redis allows:
# the cluster keeps every key of a room under one hash tag.)
# Room trimming is done here, not by XADD's MAXLEN, to know the newest ID it removes.
_APPEND = """
if ARGV[6] ~= '' and not redis.call('SET', ARGV[6], '1', 'NX', 'PX', ARGV[7]) then
  return false  -- the idempotency key was taken within its window: a repeat, no position
end
if redis.call('EXISTS', KEYS[2]) == 0 then
  local t = redis.call('TIME')
  redis.call('SET', KEYS[2], 't' .. t[1] .. t[2])
end
local id = redis.call('XADD', KEYS[1], '*', 'm', ARGV[1])
local ms = tonumber(string.match(id, '^(%d+)-'))
local size = tonumber(ARGV[3])
local oldest = (ms - tonumber(ARGV[2])) .. '-0'
for i = 3, #KEYS, 2 do
  redis.call('XADD', KEYS[i], id, 'a', ARGV[4], 'x', ARGV[5])
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
    redis.call('SET', KEYS[i + 1], gone, 'PX', 2 * tonumber(ARGV[2]))
  else
    redis.call('PEXPIRE', KEYS[i + 1], 2 * tonumber(ARGV[2]))
  end
  -- idle twice the window, the stream goes; its last ID stays a day, so that a client
  -- coming back later knows it missed what went with it
  redis.call('PEXPIRE', KEYS[i], 2 * tonumber(ARGV[2]))
  redis.call('SET', KEYS[i + 1] .. ':last', id, 'PX', math.max(2 * tonumber(ARGV[2]), 86400000))
end
return id
"""
# KEYS: the log, its trimmed mark. ARGV: window ms. Trim the log to the window, noting the newest ID removed.
_TRIM = """
local t = redis.call('TIME')
local minid = (tonumber(t[1]) * 1000 - tonumber(ARGV[1])) .. '-0'
local old = redis.call('XREVRANGE', KEYS[1], '(' .. minid, '-', 'COUNT', 1)[1]
if old then
  redis.call('XTRIM', KEYS[1], 'MINID', minid)
  redis.call('SET', KEYS[2], old[1])
end
return 1
"""


def position_of(stream_id: str | bytes) -> int:
    """A stream ID ``ms-seq`` as one integer."""
    text = stream_id.decode() if isinstance(stream_id, bytes) else stream_id
    ms, _, seq = text.partition("-")
    return int(ms) * 1_000_000 + int(seq or 0)


def stream_id(position: int) -> str:
    """The stream ID of a position."""
    return f"{position // 1_000_000}-{position % 1_000_000}"


@contextmanager
def answered(what: str) -> Iterator[None]:
    """Turn Redis's failures into Unavailable (the boundary, as db.py's for psycopg2)."""
    try:
        yield
    except (redis.RedisError, OSError) as exc:
        raise Unavailable(f"redis did not answer {what} ({type(exc).__name__})") from None


class RedisBus(LogListener):
    """The log, its reader, and (with ``RedisSignals``) the signals, over one Redis."""

    name = "redis"

    def __init__(self, url: str, *, timeout: float, emitter_prefix: str, window: float, history_size: int,
                 connections: int = 10, idempotency_window: float = 300.0) -> None:
        super().__init__()
        self._idempotency_window = idempotency_window
        self._url = url
        self._timeout = timeout
        self._window = window
        self._history_size = history_size
        self.client = bounded_client(url, timeout, connections)
        self._append = self.client.register_script(_APPEND)
        self._trim = self.client.register_script(_TRIM)
        self._reader: Any = None
        #: appends refused since the log last took one
        self._refused = 0
        self.signals = RedisSignals(self, url, timeout, emitter_prefix)
        self._last_cleanup = 0.0

    # --- the log

    def append(self, entry: Entry, key: str | None = None) -> int | None:
        keys = [LOG_KEY, EPOCH_KEY]
        args: list[Any] = [encode(entry), int(self._window * 1000), self._history_size]
        if isinstance(entry, Publication):
            for room in entry.rooms:
                keys += (HISTORY_PREFIX + room, HISTORY_TRIMMED_PREFIX + room)
            args += [entry.args, json.dumps(list(entry.except_rooms))]
        else:
            args += ["", "[]"]
        room = entry.rooms[0] if isinstance(entry, Publication) and entry.rooms else ""
        args += [f"{IDEMPOTENCY_PREFIX}{room}:{key}" if key is not None else "", int(self._idempotency_window * 1000)]
        try:
            with answered("the append"):
                answer = self._append(keys=keys, args=args)
                if answer is None:
                    return None  # a repeat of its idempotency key
                position = position_of(answer)
        except Unavailable as exc:
            self._refused += 1
            if self._refused == 1:  # one line an outage, not one per refused publish
                log.warning("the redis log does not take entries: %s", exc.message)
            raise
        if self._refused:
            log.warning("the redis log takes entries again (%d refused meanwhile)", self._refused)
            self._refused = 0
        return position

    def head(self) -> int:
        with answered("the head"):
            last: Any = self.client.xrevrange(LOG_KEY, count=1)
            trimmed: Any = self.client.get(TRIMMED_KEY)
        return max(position_of(last[0][0]) if last else 0, position_of(trimmed) if trimmed else 0)

    def signal(self, message: Signal) -> None:
        with answered("the signal"):
            self.client.publish(SIGNAL_CHANNEL, encode(message))

    # --- listening

    def start(self) -> None:
        super().start()
        self.signals.start()

    def stop(self) -> None:
        self.signals.stop()
        super().stop()
        self.client.connection_pool.disconnect()  # (it would open new ones if asked again)

    def probe(self) -> float:
        super().probe()
        return self.signals.probe()

    def _listen(self) -> None:
        reader: Any = redis.Redis.from_url(self._url, socket_timeout=BLOCK_MS / 1000 + self._timeout,
                                           socket_connect_timeout=self._timeout)
        self._reader = reader
        fresh = "t" + secrets.token_hex(8)
        reader.set(EPOCH_KEY, fresh, nx=True)
        epoch = reader.get(EPOCH_KEY)
        try:
            last = reader.xinfo_stream(LOG_KEY)["last-generated-id"]
            head = position_of(last)
        except redis.ResponseError:  # no log yet
            head = 0
        trimmed = reader.get(TRIMMED_KEY)
        after = self._resumed((epoch or fresh.encode()).decode(), head, position_of(trimmed) if trimmed else 0)
        caught_up = False
        while True:
            if caught_up and self.leader and time.monotonic() - self._last_cleanup > CLEANUP_EVERY:
                self._last_cleanup = time.monotonic()
                self._trim(keys=[LOG_KEY, TRIMMED_KEY], args=[int(max(self._window, 60.0) * 1000)], client=reader)
            answer = reader.xread({LOG_KEY: stream_id(after)}, count=CATCH_UP,
                                  block=BLOCK_MS if caught_up else None)
            entries = answer[0][1] if answer else []
            for entry_id, fields in entries:
                self._entry(position_of(entry_id), fields.get(b"m", b""))
            after = self.cursor or after
            if not caught_up and len(entries) < CATCH_UP:
                caught_up = True
                self._up()

    @property
    def leader(self) -> bool:
        return self.signals.leader

    @leader.setter
    def leader(self, value: bool) -> None:
        pass  # the signals connection holds the leadership

    def _close(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            try:
                reader.close()
            except (redis.RedisError, OSError):
                pass  # already broken


class RedisSignals(Listener):
    """The pub/sub connection: signals, and (in the leader) the emitters' channels."""

    name = "redis-signals"

    def __init__(self, bus: RedisBus, url: str, timeout: float, emitter_prefix: str) -> None:
        super().__init__()
        self._bus = bus
        self._url = url
        self._timeout = timeout
        self._patterns = (f"{emitter_prefix}#*", f"{emitter_prefix}-request#*")
        self._lock_key = f"{emitter_prefix}:orgcast:emitter-leader"
        self._token = secrets.token_hex(8)
        self.on_source: Callable[[str, Any], None] | None = None
        self._pubsub: Any = None

    def _listen(self) -> None:
        listener = redis.Redis.from_url(self._url, socket_timeout=None, socket_connect_timeout=self._timeout,
                                        health_check_interval=5)
        self._pubsub = pubsub = listener.pubsub()  # type: ignore[no-untyped-call]
        pubsub.subscribe(SIGNAL_CHANNEL)
        # The subscription is only sure once Redis confirms it.
        confirmed = pubsub.get_message(timeout=self._timeout)
        if not confirmed or confirmed.get("type") != "subscribe":
            raise ConnectionError("redis did not confirm the subscription")
        self._up()
        next_renew = 0.0
        while True:
            now = time.monotonic()
            if self.on_source is not None and now >= next_renew:
                self._lead(pubsub)
                next_renew = now + LOCK_RENEW
            message = pubsub.get_message(timeout=LOCK_RENEW)
            if message is None:
                continue
            if message["type"] == "message" and message["channel"] == SIGNAL_CHANNEL.encode():
                self._bus._signal(message["data"])
            elif message["type"] == "pmessage" and self.leader and self.on_source is not None:
                channel = message["channel"].decode("utf-8", "replace")
                self._heard()
                try:
                    self.on_source(channel, message["data"])
                except Exception:
                    self.dropped += 1
                    log.exception("handling a message on %s failed", channel[:80])

    def _lead(self, pubsub: Any) -> None:
        ttl = int(LOCK_TTL * 1000)
        client = self._bus.client
        if self.leader:
            if client.eval(_RENEW, 1, self._lock_key, self._token, ttl):
                return
            log.warning("lost the emitter leadership")
            pubsub.punsubscribe(*self._patterns)
            self.leader = False
        if client.set(self._lock_key, self._token, nx=True, px=ttl):
            pubsub.psubscribe(*self._patterns)
            self.leader = True
            log.info("this worker is the leader: it hears %s", ", ".join(self._patterns))

    def _close(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            try:
                pubsub.close()
            except (redis.RedisError, OSError):
                pass  # already broken
        if self.leader:
            try:
                self._bus.client.eval(_RELEASE, 1, self._lock_key, self._token)
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
        with answered("a ping"):
            client.ping()
        return (time.monotonic() - started) * 1000.0

    return probe
