"""orgcast: authorized realtime push over Socket.IO.

``create_app`` is the only place that wires the layers together. Its imports
are inside the function on purpose: gunicorn imports ``app.serving`` (and so
this package) in the master, before gevent patches the worker, and nothing
heavy may be imported that early (see gunicorn's
tests/workers/test_gevent_import_order.py).

Nothing starts at import or in ``create_app``: the returned callable's
``runtime.start()`` starts the bus listeners, and gunicorn's
``post_worker_init`` hook calls it in each worker (``gunicorn.conf.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.config import Settings

__version__ = "0.2.0"


@dataclass
class Runtime:
    """What runs in a worker besides the requests: the bus listeners."""

    starters: list[Callable[[], None]] = field(default_factory=list)
    stoppers: list[Callable[[], None]] = field(default_factory=list)
    drainers: list[Callable[[float], None]] = field(default_factory=list)
    started: bool = False

    def start(self) -> None:
        """Start listening (once per worker)."""
        if not self.started:
            self.started = True
            for start in self.starters:
                start()

    def stop(self) -> None:
        """Stop listening and close the listeners' connections."""
        for stop in self.stoppers:
            stop()
        self.started = False

    def drain(self, timeout: float) -> None:
        """Before the worker stops (SIGTERM): deliver what was accepted, then close every session."""
        for drain in self.drainers:
            drain(timeout)


def create_app(settings: Settings | None = None) -> Any:
    """Build the WSGI callable: Socket.IO beside Flask, wired to the database and the bus."""
    from flask import Flask
    from gevent.event import AsyncResult

    from app.auth.checker import AuthChecker
    from app.auth.ratelimit import FailureCounter, RedisFailureCounter
    from app.auth.store import AuthStore
    from app.bus.postgres import PostgresBus
    from app.config import ConfigError, load_settings
    from app.db import Database
    from app.http import Services, register
    from app.http.api import ServerApi
    from app.publish.pg_notify import PostgresSource
    from app.publish.service import Publisher
    from app.realtime.fanout import Fanout
    from app.realtime.namespace import OrgcastNamespace
    from app.realtime.recovery import Recovery
    from app.realtime.server import RoomsManager, build_server, build_wsgi
    from app.realtime.timers import Timers

    if settings is None:
        settings = load_settings()
    if settings.database_url is None:
        raise ConfigError("DATABASE_URL: required (a postgresql:// URL of the application database)")

    db = Database(settings.database_url, pool_size=settings.db_pool_size,
                  timeout=settings.db_timeout, timezone=settings.db_timezone)
    limiter: Any = FailureCounter(settings.auth_failures, settings.auth_failure_window)
    if settings.redis_url:
        # Shared by every worker and instance (README, "Brute force").
        import redis

        limiter = RedisFailureCounter(
            redis.Redis.from_url(settings.redis_url, socket_timeout=settings.db_timeout,
                                 socket_connect_timeout=settings.db_timeout),
            f"{settings.emitter_prefix}:orgcast:failures:", settings.auth_failures, settings.auth_failure_window)
    checker = AuthChecker(AuthStore(db, settings.token_sql, settings.membership_sql),
                          cache_ttl=settings.auth_cache_ttl, limiter=limiter, waiter=AsyncResult,
                          wait_timeout=settings.db_timeout + 1)

    timers = Timers()
    sio = build_server(settings, RoomsManager(), timers)
    fanout = Fanout(sio, on_forget=checker.forget_user)
    # The bus: Redis with REDIS_URL, else Postgres. Postgres always hears the
    # backends that publish in SQL (in the leader process).
    prefix = settings.emitter_prefix
    history = (settings.recovery_window, settings.history_size) if settings.recovery else None
    postgres = PostgresBus(db, settings.database_url, carries_bus=not settings.redis_url,
                           source_channels=("orgcast", f"{prefix}#/"),
                           attachments_table=settings.emitter_attachments_table, history=history)
    bus: Any = postgres
    probe_timeout = min(1.0, settings.db_timeout)
    checks = {"database": lambda: db.ping(timeout=probe_timeout)}
    if settings.redis_url:
        from app.bus.redis import RedisBus, make_redis_probe
        from app.publish.redis_emitter import RedisEmitterSource

        bus = RedisBus(settings.redis_url, timeout=settings.db_timeout, emitter_prefix=prefix, history=history)
        checks["redis"] = make_redis_probe(settings.redis_url, probe_timeout)
    publisher = Publisher(bus, broadcast_everyone=settings.emitter_broadcast)
    sio.register_namespace(OrgcastNamespace(
        checker, fanout, timers, expiry_warning=settings.expiry_warning,
        max_subscriptions=settings.max_subscriptions, max_sockets_per_user=settings.max_sockets_per_user,
        recovery=Recovery(bus, settings.recovery_window) if settings.recovery else None))
    postgres.on_source = PostgresSource(publisher, f"{prefix}#/", settings.emitter_attachments_table,
                                        postgres.fetch_attachment).handle
    runtime = Runtime()
    checks["bus"] = bus.probe
    if settings.redis_url:
        bus.on_source = RedisEmitterSource(publisher, prefix).handle
        checks["sql_publishing"] = postgres.probe
        runtime.starters.append(lambda: postgres.start(lambda message: None))
        runtime.stoppers.append(postgres.stop)
    runtime.starters.append(lambda: bus.start(fanout.handle))
    runtime.stoppers.append(bus.stop)

    def drain(timeout: float) -> None:
        # Everything accepted (202) before the signal was published on the bus
        # before this marker: once the marker is heard, it has been delivered.
        bus.barrier(min(2.0, timeout))
        sio.close_all()

    runtime.drainers.append(drain)

    flask_app = Flask(__name__)
    flask_app.config["MAX_CONTENT_LENGTH"] = settings.max_payload
    flask_app.json.sort_keys = False  # type: ignore[attr-defined]
    register(flask_app, Services(settings=settings, publisher=publisher, checks=checks,
                                 version=__version__))

    api = ServerApi(publisher, settings.api_keys, settings.max_payload, fallback=flask_app)
    wsgi = build_wsgi(sio, api, settings)
    # Handles for gunicorn's hooks, tests and operators; not part of the WSGI protocol.
    wsgi.runtime = runtime  # type: ignore[attr-defined]
    wsgi.flask_app = flask_app  # type: ignore[attr-defined]
    wsgi.sio = sio  # type: ignore[attr-defined]
    wsgi.bus = bus  # type: ignore[attr-defined]
    return wsgi
