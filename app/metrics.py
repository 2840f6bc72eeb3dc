"""Prometheus metrics (``GET /metrics``), right with several gunicorn workers.

prometheus-client's multiprocess mode: ``gunicorn.conf.py`` points
``PROMETHEUS_MULTIPROC_DIR`` at a directory it empties before the workers
start, every worker writes its values there, a scrape (served by any one
worker) sums them all, and a worker that exits has its files marked dead
(``mark_process_dead``): its live gauges — the connected sockets — stop
counting at once, its counters stay in the totals. Without gunicorn (a test
building the app in-process) the values live in this process.

Labels are bounded sets chosen here — result codes, sources, bus backends —
never a token, user id or organization id (secrets, and one series per
user).

The services and the data access report through observer protocols of
their own (``auth.checker.Observer``, ``publish.service.Observer``, the bus
and database callbacks); ``Metrics`` implements all of them, so none of
them imports Prometheus.
"""

from __future__ import annotations

import os
from collections import Counter as Tally
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess as prometheus_multiprocess
from prometheus_client import values as prometheus_values

from app import process
from app.errors import API_ERRORS, REFUSALS

#: seconds: from a fast cache hit to the database timeout
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
#: what ``orgcast_connection_attempts_total{result}`` may say; anything else is "other"
RESULTS = frozenset({"ok", *REFUSALS})
SOURCES = frozenset({"http", "pg-notify", "postgres-emitter", "redis-emitter", "presence"})


def multiprocess_dir() -> str | None:
    """The directory the workers share their values in, when gunicorn set one."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    """orgcast's metrics, and the observer every part reports to."""

    def __init__(self, version: str = "0") -> None:
        #: this process's own counts, as plain numbers (``/admin/stats``)
        self.tally: Tally[str] = Tally()
        if multiprocess_dir():
            # prometheus-client's own multiprocess values, with the process id
            # cached (it asks at every change: a system call each).
            # internal: prometheus_client.values.{ValueClass,MultiProcessValue}
            prometheus_values.ValueClass = prometheus_values.MultiProcessValue(  # type: ignore[no-untyped-call]
                process_identifier=process.pid)
        self.registry = registry = CollectorRegistry()
        kw: dict[str, Any] = {"registry": registry}
        self.sockets = Gauge("orgcast_connected_sockets", "Sockets admitted to / and connected now.",
                             multiprocess_mode="livesum", **kw)
        self.attempts = Counter("orgcast_connection_attempts", "Socket.IO CONNECTs to /, by result (ok or "
                                "the refusal code).", ["result"], **kw)
        self.auth_seconds = Histogram("orgcast_auth_duration_seconds", "Time the connect check took, cache "
                                      "hits included.", buckets=LATENCY_BUCKETS, **kw)
        self.auth_answers = Counter("orgcast_auth_answers", "Authorizations by what answered them: database, "
                                    "cache, coalesced (another lookup in flight), limiter.", ["by"], **kw)
        self.db_seconds = Histogram("orgcast_db_query_duration_seconds", "Time a database operation took "
                                    "(pool wait, connect, query).", buckets=LATENCY_BUCKETS, **kw)
        self.db_failures = Counter("orgcast_db_failures", "Database operations that failed or timed out.", **kw)
        self.events_published = Counter("orgcast_events_published", "Events published on the bus, by source.",
                                 ["source"], **kw)
        self.deliveries = Counter("orgcast_deliveries", "Events written to a socket.", **kw)
        self.deliveries_dropped = Counter("orgcast_deliveries_dropped", "Deliveries not made: the socket was "
                                          "closing.", **kw)
        self.slow_consumers = Counter("orgcast_slow_consumers_disconnected", "Clients cut off for not reading "
                                      "(ORGCAST_SEND_BUFFER).", **kw)
        self.bus_messages = Counter("orgcast_bus_messages_received", "Messages heard on the bus.", ["bus"], **kw)
        self.bus_reconnects = Counter("orgcast_bus_reconnects", "Times a bus listener lost its connection.",
                                      ["bus"], **kw)
        self.bus_up = Gauge("orgcast_bus_up", "1 when every live worker's bus listener is connected.", ["bus"],
                            multiprocess_mode="livemin", **kw)
        self.rate_limited = Counter("orgcast_rate_limited", "Attempts refused by a per-address limit: "
                                    "auth_failures (rate_limited) or pending_sessions (429).", ["limit"], **kw)
        self.recoveries = Counter("orgcast_recoveries", "Reconnects that asked for their session back, by "
                                  "result (recovered, not_recovered).", ["result"], **kw)
        self.ready = Gauge("orgcast_ready", "1 when every readiness check passed, at the last scrape or /readyz.",
                           multiprocess_mode="livemostrecent", **kw)
        self.check_up = Gauge("orgcast_check_up", "1 when this readiness check passed, at the last scrape or "
                              "/readyz.", ["check"], multiprocess_mode="livemostrecent", **kw)
        self.sockets_revoked = Counter("orgcast_sockets_revoked", "Sockets whose rights were taken back while "
                                       "connected, by reason (forbidden: a membership; token_invalid, "
                                       "token_expired: the token).", ["reason"], **kw)
        self.revalidation_seconds = Histogram("orgcast_revalidation_duration_seconds", "Time one re-check of this "
                                              "worker's sockets took (its batches, spread over the interval).",
                                              buckets=(0.01, 0.1, 1, 5, 15, 30, 60, 120, 300), **kw)
        self.webhook_events = Counter("orgcast_webhook_events", "Webhook events, by result: sent, queue_full "
                                      "(dropped: the receiver is too slow), retries_exhausted (dropped after 5 "
                                      "minutes of retries).", ["result"], **kw)
        self.api_refused = Counter("orgcast_api_refused", "Server API requests refused, by code (unavailable: "
                                   "the log did not take the event, 503).", ["code"], **kw)
        self.source_dropped = Counter("orgcast_source_messages_dropped", "Messages of pg_notify or an emitter "
                                      "that could not be delivered, by source.", ["source"], **kw)
        Gauge("orgcast_build_info", "orgcast's version.", ["version"], multiprocess_mode="max",
              **kw).labels(version).set(1)
        # Every series a dashboard or an alert reads exists from the first scrape, at 0.
        for result in sorted(RESULTS):
            self.attempts.labels(result)
        for source in sorted(SOURCES):
            self.events_published.labels(source)
            self.source_dropped.labels(source)
        for by in ("database", "cache", "coalesced", "limiter"):
            self.auth_answers.labels(by)
        for limit in ("auth_failures", "pending_sessions"):
            self.rate_limited.labels(limit)
        for result in ("recovered", "not_recovered"):
            self.recoveries.labels(result)
        for code in sorted(API_ERRORS):
            self.api_refused.labels(code)
        for reason in ("forbidden", "token_invalid", "token_expired"):
            self.sockets_revoked.labels(reason)
        for result in ("sent", "queue_full", "retries_exhausted"):
            self.webhook_events.labels(result)

    def buses(self, *names: str) -> None:
        """Create the series of the bus backends this process listens to."""
        for name in names:
            self.bus_messages.labels(name)
            self.bus_reconnects.labels(name)

    # --- the scrape

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text of every worker's values (body, content type)."""
        if multiprocess_dir() is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        summed = CollectorRegistry()
        prometheus_multiprocess.MultiProcessCollector(summed)  # type: ignore[no-untyped-call]
        return generate_latest(summed), CONTENT_TYPE_LATEST

    def readiness(self, checks: dict[str, bool]) -> None:
        """Record the result of the readiness checks (each by name)."""
        for name, ok in checks.items():
            self.check_up.labels(name).set(1 if ok else 0)
        self.ready.set(1 if all(checks.values()) else 0)

    # --- the connect path (realtime/namespace.py, auth/checker.py)

    def attempt(self, result: str) -> None:
        result = result if result in RESULTS else "other"
        self.attempts.labels(result).inc()
        self.tally["attempt " + result] += 1

    def socket_opened(self) -> None:
        self.sockets.inc()

    def socket_closed(self) -> None:
        self.sockets.dec()

    def revoked(self, reason: str, count: int = 1) -> None:
        known = reason if reason in ("forbidden", "token_invalid", "token_expired") else "forbidden"
        self.sockets_revoked.labels(known).inc(count)
        self.tally["revoked"] += count

    def webhook(self, result: str, count: int = 1) -> None:
        self.webhook_events.labels(result).inc(count)
        self.tally["webhooks " + result] += count

    def revalidated(self, seconds: float) -> None:
        self.revalidation_seconds.observe(seconds)

    def recovery(self, recovered: bool) -> None:
        self.recoveries.labels("recovered" if recovered else "not_recovered").inc()

    def authorized(self, result: str, seconds: float, answered_by: str) -> None:
        self.auth_seconds.observe(seconds)
        self.auth_answers.labels(answered_by).inc()
        self.tally["auth " + answered_by] += 1
        if result == "rate_limited":
            self.rate_limited.labels("auth_failures").inc()

    def pending_refused(self) -> None:
        self.rate_limited.labels("pending_sessions").inc()

    # --- publishing and delivery (publish/service.py, realtime/fanout.py, transport/websocket.py)

    def published(self, source: str, count: int = 1) -> None:
        self.events_published.labels(source if source in SOURCES else "other").inc(count)
        self.tally["published"] += count

    def delivered(self, count: int, dropped: int = 0) -> None:
        if count:
            self.deliveries.inc(count)
            self.tally["delivered"] += count
        if dropped:
            self.deliveries_dropped.inc(dropped)
            self.tally["dropped"] += dropped

    def slow_consumer(self) -> None:
        self.slow_consumers.inc()
        self.tally["slow_consumers"] += 1

    def refused(self, code: str) -> None:
        self.api_refused.labels(code if code in API_ERRORS else "internal_error").inc()
        self.tally["refused " + code] += 1

    def source_drop(self, source: str) -> None:
        self.source_dropped.labels(source if source in SOURCES else "other").inc()

    # --- the bus and the database (bus/base.py, db.py)

    def bus_message(self, bus: str) -> None:
        self.bus_messages.labels(bus).inc()

    def bus_state(self, bus: str, up: bool, reconnect: bool = False) -> None:
        self.bus_up.labels(bus).set(1 if up else 0)
        if reconnect:
            self.bus_reconnects.labels(bus).inc()

    def query(self, seconds: float, ok: bool) -> None:
        self.db_seconds.observe(seconds)
        if not ok:
            self.db_failures.inc()
