"""Operator views behind the API key: ``/admin/config``."""

from __future__ import annotations

from typing import Any

from flask import Blueprint

from app.http import services
from app.http.apikey import require_api_key

bp = Blueprint("admin", __name__, url_prefix="/admin")


@bp.get("/config")
@require_api_key
def config() -> Any:
    """Return the effective configuration, secrets redacted."""
    svc = services()
    return {"version": svc.version, "settings": svc.settings.public_dict()}
