"""Operator views behind the API key: ``/admin/config``, ``/admin/stats``, and the ``/admin`` page.

The page itself holds no data and needs no key: it asks for the key in a
form, keeps it in the page's memory only (never in a URL or in storage),
and sends it with each ``/admin/stats`` request.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, abort, render_template

from app.http import services
from app.http.apikey import require_api_key

bp = Blueprint("admin", __name__, url_prefix="/admin", template_folder="templates")


@bp.get("/config")
@require_api_key
def config() -> Any:
    """Return the effective configuration, secrets redacted."""
    svc = services()
    return {"version": svc.version, "settings": svc.settings.public_dict()}


@bp.get("/stats")
@require_api_key
def stats() -> Any:
    """Sockets, busiest organizations, bus, auth cache and counts, summed over every worker and instance."""
    svc = services()
    if svc.stats is None:
        abort(404)
    return {"version": svc.version, **svc.stats()}


@bp.get("")
@bp.get("/")
def page() -> Any:
    """The status page (no build step, no CDN: one file)."""
    response = render_template("admin.html", version=services().version)
    headers = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer",
               "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
                                          "style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:"}
    return response, 200, headers
