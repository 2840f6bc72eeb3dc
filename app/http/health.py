"""Liveness, readiness and metrics: ``/healthz``, ``/readyz``, ``/metrics`` (README, "Operator routes")."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, abort, request

from app.errors import Unavailable
from app.http import services
from app.http.apikey import check_api_key

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Any:
    """Answer 200 while the process serves."""
    return {"status": "ok"}


def run_checks() -> dict[str, dict[str, Any]]:
    """Every readiness probe's result, by name (each bounded in time)."""
    svc = services()
    checks: dict[str, dict[str, Any]] = {}
    for name, probe in svc.checks.items():
        try:
            checks[name] = {"ok": True, "latency_ms": round(probe(), 2)}
        except Unavailable as exc:
            checks[name] = {"ok": False, "error": exc.message}
    if svc.on_readiness is not None:
        svc.on_readiness({name: bool(c["ok"]) for name, c in checks.items()})
    return checks


@bp.get("/readyz")
def readyz() -> Any:
    """Answer 200 when every dependency answers, else 503 naming the failing one."""
    checks = run_checks()
    ready = all(c["ok"] for c in checks.values())
    body = {"status": "ok" if ready else "unavailable", "checks": checks}
    return body, 200 if ready else 503


@bp.get("/metrics")
def metrics() -> Any:
    """The Prometheus text of every worker of this instance (API key when ORGCAST_METRICS_AUTH is on)."""
    svc = services()
    if svc.settings.metrics_auth:
        check_api_key(request.headers.get("Authorization", ""), svc.settings.api_keys)
    if svc.metrics is None:
        abort(404)
    run_checks()  # orgcast_ready: what /readyz would say now
    body, content_type = svc.metrics()
    return Response(body, content_type=content_type)
