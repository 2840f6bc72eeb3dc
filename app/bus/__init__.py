"""The bus that carries emits between workers and hosts.

Today one process delivers to its own sockets (python-socketio's in-memory
manager). Cross-worker delivery plugs in here as a ``PubSubManager``
(Postgres LISTEN/NOTIFY by default, Redis with ``REDIS_URL``) without
touching the publish path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import socketio

from app.config import Settings
from app.errors import Unavailable

log = logging.getLogger(__name__)


def make_client_manager(settings: Settings) -> socketio.Manager:
    """Return the client manager the Socket.IO server should use."""
    return socketio.Manager()


def make_redis_probe(url: str, timeout: float) -> Callable[[], float]:
    """Return a readiness probe that pings Redis and returns the latency in ms.

    :raise Unavailable: (from the probe) Redis did not answer in time
    """
    import redis

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
