"""The Redis bus: PUBLISH to publish, one pub/sub connection per worker to hear.

redis-py's sockets are cooperative under gevent (gunicorn's worker patches
the standard library before the app is imported).

The same connection, in the one process of the deployment that holds
``<prefix>:emitter-leader`` (a key with a short expiry that its holder
renews), also pattern-subscribes to the channels of the Socket.IO Redis
emitters (``<prefix>#*``, ``<prefix>-request#*``) and hands each message to
the source handler. When the leader dies its key expires and another worker
takes it within ``LOCK_TTL`` seconds.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

import redis

from app.bus.base import UP, Bus, SourceHandler
from app.errors import Unavailable

log = logging.getLogger(__name__)

BUS_CHANNEL = "orgcast:bus"
LOCK_TTL = 3.0
LOCK_RENEW = 1.0
_RENEW = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
          "return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end")
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"


class RedisBus(Bus):
    """Redis pub/sub between every worker of every instance sharing the Redis."""

    name = "redis"

    def __init__(self, url: str, *, timeout: float, emitter_prefix: str,
                 on_source: SourceHandler | None = None) -> None:
        super().__init__()
        self._url = url
        self._timeout = timeout
        self._client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self._patterns = (f"{emitter_prefix}#*", f"{emitter_prefix}-request#*")
        self._lock_key = f"{emitter_prefix}:orgcast:emitter-leader"
        self._token = secrets.token_hex(8)
        self.on_source = on_source
        self._pubsub: Any = None

    def _publish(self, text: str) -> None:
        try:
            self._client.publish(BUS_CHANNEL, text)
        except (redis.RedisError, OSError) as exc:
            log.warning("redis publish failed: %s", type(exc).__name__)
            raise Unavailable("redis did not take the message; retry") from None

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


def make_redis_probe(url: str, timeout: float) -> Callable[[], float]:
    """Return a readiness probe that pings Redis and returns the latency in ms.

    :raise Unavailable: (from the probe) Redis did not answer in time
    """
    client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)

    def probe() -> float:
        started = time.monotonic()
        try:
            client.ping()
        except (redis.RedisError, OSError) as exc:
            log.warning("redis error: %s", type(exc).__name__)
            raise Unavailable("redis did not answer") from None
        return (time.monotonic() - started) * 1000.0

    return probe
