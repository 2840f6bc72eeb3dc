"""Public routes: ``/config`` for clients, and ``/demo`` when demo data is loaded."""

from __future__ import annotations

import os
from typing import Any

from flask import Blueprint, Response, abort, render_template, request, send_from_directory

from app.http import services
from app.rooms import ORGANIZATION_PREFIX, USER_PREFIX

bp = Blueprint("public", __name__, template_folder="templates")

CLIENT_JS = "socket.io.min.js"


@bp.get("/config")
def config() -> Any:
    """Return what a client needs to connect; no secrets."""
    svc = services()
    return {
        "version": svc.version,
        "socketio": {"path": "/socket.io/", "transports": list(svc.settings.effective_transports)},
        "auth": {
            "fields": ["token", "organizationId"],
            "query": ["token", "organizationId"],
            "header": "Authorization: Bearer <token>",
        },
        "rooms": {"organization": ORGANIZATION_PREFIX + "<organizationId>",
                  "user": USER_PREFIX + "<user_id>"},
        "events": {"server": ["news", "session_expiring"], "client": ["subscribe", "unsubscribe", "refresh"]},
    }


@bp.after_app_request
def allow_configured_origins(response: Response) -> Response:
    """Let the browser origins of ORGCAST_CORS_ORIGINS read ``/config``.

    Socket.IO applies the same list to its own path; the server API and the
    operator routes are for backends and stay same-origin.
    """
    if request.path != "/config":
        return response
    allowed = services().settings.cors_origins
    origin = request.headers.get("Origin")
    if origin and ("*" in allowed or origin.rstrip("/") in allowed):
        response.headers["Access-Control-Allow-Origin"] = "*" if "*" in allowed else origin
        response.vary.add("Origin")
    return response


@bp.get("/demo")
def demo() -> Any:
    """Serve the demo page (only when ``make run`` loaded demo data)."""
    if not services().settings.demo_dir:
        abort(404)
    return render_template("demo.html", transports=list(services().settings.effective_transports))


@bp.get("/demo/" + CLIENT_JS)
def demo_client() -> Any:
    """Serve the socket.io client that ``make run`` fetched from npm."""
    folder = services().settings.demo_dir
    if not folder or not os.path.isfile(os.path.join(folder, CLIENT_JS)):
        abort(404)
    return send_from_directory(folder, CLIENT_JS, mimetype="text/javascript", max_age=3600)
