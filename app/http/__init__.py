"""The HTTP edge: blueprints, and Flask's JSON error handlers.

Every error a Flask route can give, werkzeug's 404/405/413 included, leaves
as ``{"error": {"code": ..., "message": ...}}`` with the status of
``errors.API_ERRORS``; the server API (``api.py``), Engine.IO
(``transport/engine.py``) and the worker (``serving.py``) build the same body
with ``errors.http_error``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, current_app
from werkzeug.exceptions import HTTPException

from app.config import Settings
from app.errors import ApiError, Unavailable, error_body, http_error_headers
from app.publish.service import Publisher

log = logging.getLogger(__name__)

EXTENSION = "orgcast"

#: werkzeug's HTTP errors by status, mapped onto our codes
_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found",
               405: "method_not_allowed", 413: "payload_too_large",
               415: "unsupported_media_type"}


@dataclass
class Services:
    """What the routes may use; built and attached by ``create_app``."""

    settings: Settings
    publisher: Publisher
    #: readiness probes by name: each returns a latency in ms or raises Unavailable
    checks: dict[str, Callable[[], float]] = field(default_factory=dict)
    version: str = "0"
    #: the Prometheus text of every worker: (body, content type)
    metrics: Callable[[], tuple[bytes, str]] | None = None
    #: the /admin/stats body, summed over every worker (raises Unavailable)
    stats: Callable[[], dict[str, Any]] | None = None
    #: told the result of each readiness check, by name (the metrics)
    on_readiness: Callable[[dict[str, bool]], None] | None = None


def services() -> Services:
    """Return the services of the current app."""
    found: Services = current_app.extensions[EXTENSION]
    return found


def register(app: Flask, svc: Services) -> None:
    """Attach the services, the blueprints and the JSON error handlers."""
    from app.http import admin, health, public

    app.extensions[EXTENSION] = svc
    for module in (health, public, admin):
        app.register_blueprint(module.bp)

    @app.errorhandler(ApiError)
    def api_error(exc: ApiError) -> Any:
        return error_body(exc.code, exc.message), exc.status, http_error_headers(exc.status)

    @app.errorhandler(Unavailable)
    def unavailable(exc: Unavailable) -> Any:
        return error_body("unavailable", exc.message), 503, http_error_headers(503)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Any:
        status = exc.code or 500
        code = _HTTP_CODES.get(status, "bad_request" if status < 500 else "internal_error")
        # Keep what werkzeug says about the error, such as Allow on a 405.
        headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}
        return error_body(code), status, headers

    @app.errorhandler(Exception)
    def internal_error(exc: Exception) -> Any:
        log.exception("unhandled error in %s", type(exc).__name__)
        return error_body("internal_error"), 500
