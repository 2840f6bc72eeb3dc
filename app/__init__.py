"""orgcast: authorized realtime push over Socket.IO.

``create_app`` is the only place that wires the layers together. Its imports
are inside the function on purpose: gunicorn imports ``app.serving`` (and so
this package) in the master, before gevent patches the worker, and nothing
heavy may be imported that early (see gunicorn's
tests/workers/test_gevent_import_order.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.config import Settings

__version__ = "0.1.0"


def create_app(settings: Settings | None = None) -> Any:
    """Build the WSGI callable: Socket.IO beside Flask, wired to the database."""
    from flask import Flask

    from app import bus
    from app.auth.checker import AuthChecker
    from app.auth.store import AuthStore
    from app.config import ConfigError, load_settings
    from app.db import Database
    from app.http import Services, register
    from app.publish.service import Publisher
    from app.realtime.fanout import Fanout
    from app.realtime.namespace import OrgcastNamespace
    from app.realtime.server import build_server, build_wsgi
    from app.realtime.timers import Timers

    if settings is None:
        settings = load_settings()
    if settings.database_url is None:
        raise ConfigError("DATABASE_URL: required (a postgresql:// URL of the application database)")

    db = Database(settings.database_url, pool_size=settings.db_pool_size,
                  timeout=settings.db_timeout, timezone=settings.db_timezone)
    checker = AuthChecker(AuthStore(db, settings.token_sql, settings.membership_sql),
                          cache_ttl=settings.auth_cache_ttl)

    sio = build_server(settings, bus.make_client_manager(settings), Timers())
    sio.register_namespace(OrgcastNamespace(checker))
    publisher = Publisher(Fanout(sio), on_user_disconnected=checker.forget_user)

    flask_app = Flask(__name__)
    flask_app.config["MAX_CONTENT_LENGTH"] = settings.max_payload
    flask_app.json.sort_keys = False  # type: ignore[attr-defined]
    probe_timeout = min(1.0, settings.db_timeout)
    checks = {"database": lambda: db.ping(timeout=probe_timeout)}
    if settings.redis_url:
        checks["redis"] = bus.make_redis_probe(settings.redis_url, probe_timeout)
    register(flask_app, Services(settings=settings, publisher=publisher, checks=checks,
                                 version=__version__))

    wsgi = build_wsgi(sio, flask_app, settings)
    # Handles for tests and operators; not part of the WSGI protocol.
    wsgi.flask_app = flask_app  # type: ignore[attr-defined]
    wsgi.sio = sio  # type: ignore[attr-defined]
    return wsgi
