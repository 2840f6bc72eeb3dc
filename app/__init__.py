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

import logging
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
    import gevent
    from flask import Flask

    from app import log
    from app.bus.cluster import Cluster
    from app.bus.envelope import Member
    from app.config import ConfigError, load_settings
    from app.db import Database
    from app.http import Services, register
    from app.http.api import ServerApi
    from app.metrics import Metrics
    from app.publish.service import Publisher
    from app.realtime.fanout import Fanout
    from app.realtime.namespace import OrgcastNamespace
    from app.realtime.presence import Presence
    from app.realtime.recovery import Recovery
    from app.realtime.revalidate import Revalidator
    from app.realtime.stats import WorkerStats, summarize
    from app.timers import Timers
    from app.transport.connection import Connection
    from app.transport.server import UNTRUSTED_FORWARDING, RoomsManager, build_server, build_wsgi

    if settings is None:
        settings = load_settings()
    if settings.database_url is None:
        raise ConfigError("DATABASE_URL: required (a postgresql:// URL of the application database)")

    metrics = Metrics(__version__)
    db = Database(settings.database_url, pool_size=settings.db_pool_size,
                  timeout=settings.db_timeout, timezone=settings.db_timezone, observer=metrics.query)
    checker = _build_checker(settings, db, metrics)
    runtime = Runtime()
    bus, store, postgres, checks = _build_bus(settings, db, metrics, runtime)
    publisher = Publisher(bus, broadcast_everyone=settings.emitter_broadcast, observer=metrics)
    _build_sources(settings, publisher, postgres, bus, metrics)

    timers = Timers()
    sio = build_server(settings, RoomsManager(), timers)
    sio.on_pending_refused = metrics.pending_refused
    Connection.on_slow_consumer = metrics.slow_consumer
    from app.serving import configure

    configure(settings.max_payload, settings.send_buffer, settings.header_timeout, settings.body_timeout)
    fanout = Fanout(sio, on_forget=checker.forget_user, observer=metrics, offsets=settings.recovery)
    fanout.cursor = lambda: bus.cursor
    fanout.first_cursor = bus.wait_for_cursor
    bus.on_entry = fanout.handle
    bus.on_lost = lambda why: sio.close_all()

    # Every worker of every instance, over the bus: /admin/stats and presence.
    cluster = Cluster(bus, timeout=settings.cluster_timeout)
    bus.on_signal = cluster.handle
    sessions: dict[str, Any] = {}
    webhooks = None
    if settings.webhook_url:
        from app.realtime.webhooks import Webhooks

        webhooks = Webhooks(settings.webhook_url, settings.webhook_key or "", settings.webhook_secret or "",
                            is_leader=lambda: bus.leader, store=store, observer=metrics)
        fanout.on_member = webhooks.member
        runtime.starters.append(webhooks.start)
        runtime.stoppers.append(webhooks.stop)
    tracked = settings.presence_events or webhooks is not None
    presence = Presence(
        cluster, members=fanout.members,
        user_of=lambda sid: getattr(sessions.get(sid), "user_id", None),
        organizations_of=lambda sid: list(getattr(sessions.get(sid), "organizations", ())),
        store=store if tracked else None,
        emitter=publisher if settings.presence_events else None,
        linger=settings.webhook_linger if webhooks is not None else 0.0,
        on_change=(lambda joined, org, user: bus.append(Member(org, user, joined))) if webhooks is not None else None)
    cluster.answer("presence.organization", presence.organization_here)
    cluster.answer("presence.user", presence.user_here)
    cluster.on_gone.append(presence.forget)
    cluster.on_taken_for_gone.append(presence.taken_for_gone)
    recovery = Recovery(store, store, epoch=lambda: bus.epoch) if settings.recovery else None
    namespace = OrgcastNamespace(
        checker, fanout, timers, expiry_warning=settings.expiry_warning,
        max_subscriptions=settings.max_subscriptions, max_sockets_per_user=settings.max_sockets_per_user,
        recovery=recovery, observer=metrics, presence=presence if presence.events else None,
        history=store, rewind_max=settings.rewind_max)
    sessions = namespace.sessions
    sio.register_namespace(namespace)

    def revoke(organization_id: str, user_id: str, code: str) -> None:
        checker.forget_membership(organization_id, user_id)
        namespace.revoke(organization_id, user_id, code)

    fanout.on_revoke = revoke
    revalidator = Revalidator(checker, namespace, settings.revalidate_interval, observer=metrics.revalidated)

    worker_stats = WorkerStats(
        peer=cluster.peer, sockets=lambda: len(namespace.sessions), organizations=fanout.organization_sizes,
        bus=bus.stats, auth=lambda: {"cached": checker.cached}, tally=metrics.tally,
        warnings=lambda: [UNTRUSTED_FORWARDING] if sio.untrusted_forwarding else [])
    cluster.answer("stats", worker_stats.answer)

    def stats() -> dict[str, Any]:
        answers = cluster.ask("stats")
        return summarize(answers.by_peer, answers.partial, answers.latency_ms)

    runtime.starters += [bus.start, cluster.start, worker_stats.start, presence.start, revalidator.start,
                         # the INFO lines of one loop turn in one write (app/log.py)
                         lambda: log.batching(gevent.get_hub().loop.run_callback)]
    runtime.stoppers += [revalidator.stop, presence.stop, worker_stats.stop, cluster.stop, bus.stop,
                         lambda: log.batching(None)]
    if recovery is not None:
        keeper = _keeper(recovery, namespace.kept_sessions, settings.recovery_window / 2,
                         ready=lambda: bus.cursor is not None)
        runtime.starters.append(keeper.start)
        runtime.stoppers.append(keeper.stop)

    def drain(timeout: float) -> None:
        # Everything accepted (202) before the signal is in the log before its
        # head now: once this worker has read that far, it has been delivered.
        try:
            bus.caught_up(bus.head(), min(2.0, timeout))
        except Exception as exc:  # the bus is down: close anyway, clients recover elsewhere
            logging.getLogger(__name__).warning("stopping without reaching the log's head: %s", exc)
        sio.close_all()

    runtime.drainers.append(drain)

    flask_app = Flask(__name__)
    flask_app.config["MAX_CONTENT_LENGTH"] = settings.max_payload
    flask_app.json.sort_keys = False  # type: ignore[attr-defined]
    register(flask_app, Services(settings=settings, publisher=publisher, checks=checks,
                                 version=__version__, metrics=metrics.render, stats=stats,
                                 on_readiness=metrics.readiness))

    api = ServerApi(publisher, settings.api_keys, settings.max_payload, fallback=flask_app, presence=presence,
                    observer=metrics)
    from app.auth.credentials import client_address, parse_networks
    from app.http.stream import EventStreams

    trusted = parse_networks(settings.trusted_proxies)
    streams = EventStreams(sio, api, heartbeat=settings.ping_interval, offsets=settings.recovery,
                           address_of=lambda environ: client_address(environ, trusted))
    wsgi = build_wsgi(sio, streams, settings)
    # Handles for gunicorn's hooks, tests and operators; not part of the WSGI protocol.
    wsgi.runtime = runtime  # type: ignore[attr-defined]
    wsgi.flask_app = flask_app  # type: ignore[attr-defined]
    wsgi.sio = sio  # type: ignore[attr-defined]
    wsgi.bus = bus  # type: ignore[attr-defined]
    wsgi.metrics = metrics  # type: ignore[attr-defined]
    wsgi.cluster = cluster  # type: ignore[attr-defined]
    return wsgi


def _build_checker(settings: Settings, db: Any, metrics: Any) -> Any:
    """The connect check: the configured SQL, its cache, and the failure counter (shared through Redis)."""
    from gevent.event import AsyncResult

    from app.auth.checker import AuthChecker
    from app.auth.ratelimit import FailureCounter, RedisFailureCounter
    from app.auth.store import AuthStore

    limiter: Any = FailureCounter(settings.auth_failures, settings.auth_failure_window)
    if settings.redis_url:
        # Shared by every worker and instance (README, "Brute force").
        from app.bus.redis import bounded_client

        limiter = RedisFailureCounter(
            bounded_client(settings.redis_url, settings.db_timeout, settings.db_pool_size),
            f"{settings.emitter_prefix}:orgcast:failures:", settings.auth_failures, settings.auth_failure_window)
    return AuthChecker(AuthStore(db, settings.token_sql, settings.membership_sql),
                       cache_ttl=settings.auth_cache_ttl, limiter=limiter, waiter=AsyncResult,
                       wait_timeout=settings.db_timeout + 1, observer=metrics)


def _build_bus(settings: Settings, db: Any, metrics: Any, runtime: Runtime) -> tuple[Any, Any, Any, dict[str, Any]]:
    """The bus (Redis with REDIS_URL, else Postgres), its store, the Postgres listener, and the readiness checks.

    Postgres always hears the backends that publish in SQL (in the leader process).
    """
    from app.bus.postgres import PostgresBus
    from app.bus.postgres_store import PostgresStore

    prefix = settings.emitter_prefix
    postgres = PostgresBus(db, settings.listen_database_url or settings.database_url or "",
                           window=settings.recovery_window,
                           history_size=settings.history_size, carries_bus=not settings.redis_url,
                           source_channels=("orgcast", f"{prefix}#/"),
                           attachments_table=settings.emitter_attachments_table,
                           idempotency_window=settings.idempotency_window)
    probe_timeout = min(1.0, settings.db_timeout)
    checks: dict[str, Any] = {"database": lambda: db.ping(timeout=probe_timeout)}
    bus: Any = postgres
    store: Any = PostgresStore(db, settings.recovery_window)
    if settings.redis_url:
        from app.bus.redis import RedisBus, make_redis_probe
        from app.bus.redis_store import RedisStore

        bus = RedisBus(settings.redis_url, timeout=settings.db_timeout, emitter_prefix=prefix,
                       window=settings.recovery_window, history_size=settings.history_size,
                       connections=settings.db_pool_size, idempotency_window=settings.idempotency_window)
        store = RedisStore(bus.client, settings.recovery_window, settings.history_size)
        checks["redis"] = make_redis_probe(settings.redis_url, probe_timeout)
        checks["sql_publishing"] = postgres.probe
        bus.signals.observer = metrics
        runtime.starters.append(postgres.start)
        runtime.stoppers.append(postgres.stop)
    checks["bus"] = bus.probe
    for listener in {postgres, bus}:
        listener.observer = metrics
        metrics.buses(listener.name)
    return bus, store, postgres, checks


def _build_sources(settings: Settings, publisher: Any, postgres: Any, bus: Any, metrics: Any) -> None:
    """What backends publish in SQL and with the Socket.IO emitters, heard by the leader, to the Publisher."""
    from app.publish.pg_notify import PostgresSource

    prefix = settings.emitter_prefix
    sql_source = PostgresSource(publisher, f"{prefix}#/", settings.emitter_attachments_table,
                                postgres.fetch_attachment)
    sql_source.drops.on_drop = metrics.source_drop
    postgres.on_source = sql_source.handle
    if settings.redis_url:
        from app.publish.redis_emitter import RedisEmitterSource

        redis_source = RedisEmitterSource(publisher, prefix)
        redis_source.drops.on_drop = metrics.source_drop
        bus.signals.on_source = redis_source.handle


def _keeper(recovery: Any, sids: Callable[[], list[str]], every: float, ready: Callable[[], bool]) -> Any:
    """Fetch the recovery secret, then keep the organizations of live sessions for their recovery."""
    import gevent

    from app.realtime.background import Background

    class Keeper(Background):
        def _run(self) -> None:
            # Once the bus's listener has read the log (it made orgcast's schema, where the secret is).
            while not ready() or not recovery.load_secret():
                gevent.sleep(0.2)
            while True:
                gevent.sleep(every)
                kept = sids()
                if kept:
                    recovery.keep(kept)

    return Keeper()
