"""Liveness and readiness: ``/healthz``, ``/readyz`` (README, "Operator routes")."""

from __future__ import annotations

from typing import Any

from flask import Blueprint

from app.errors import Unavailable
from app.http import services

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Any:
    """Answer 200 while the process serves."""
    return {"status": "ok"}


@bp.get("/readyz")
def readyz() -> Any:
    """Answer 200 when every dependency answers, else 503 naming the failing one."""
    checks: dict[str, dict[str, Any]] = {}
    for name, probe in services().checks.items():
        try:
            checks[name] = {"ok": True, "latency_ms": round(probe(), 2)}
        except Unavailable as exc:
            checks[name] = {"ok": False, "error": exc.message}
    ready = all(c["ok"] for c in checks.values())
    body = {"status": "ok" if ready else "unavailable", "checks": checks}
    return body, 200 if ready else 503
