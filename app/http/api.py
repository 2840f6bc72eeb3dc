"""The server API: publish to an organization or a user, disconnect a user.

The README's "Publishing over HTTP" is this module's documentation.
"""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, request

from app.errors import ApiError
from app.http import services
from app.http.apikey import require_api_key

bp = Blueprint("api", __name__, url_prefix="/api/v1")

SOURCE = "http"


def _event_body() -> tuple[Any, Any]:
    """Return (event, data) from the JSON body; a body without ``data`` publishes ``null``.

    :raise ApiError: bad_request, payload_too_large (through werkzeug)
    """
    raw = request.get_data(cache=True)
    limit = request.max_content_length
    if (request.content_length is None and limit is not None and len(raw) >= limit
            and request.environ["wsgi.input"].read(1)):
        # A body without Content-Length (chunked) stops at the limit: werkzeug
        # returns it cut short instead of refusing it, which reads as bad JSON.
        raise ApiError("payload_too_large")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested too deeply
        raise ApiError("bad_request") from None
    if not isinstance(body, dict) or "event" not in body:
        raise ApiError("bad_request")
    return body["event"], body.get("data")


@bp.post("/organizations/<organization_id>/events")
@require_api_key
def publish_to_organization(organization_id: str) -> Any:
    """Publish ``{"event", "data"}`` to ``organization.<id>``."""
    event, data = _event_body()
    room = services().publisher.publish_to_organization(organization_id, event, data, SOURCE)
    return {"status": "accepted", "room": room}, 202


@bp.post("/users/<user_id>/events")
@require_api_key
def publish_to_user(user_id: str) -> Any:
    """Publish ``{"event", "data"}`` to ``user.<user_id>``."""
    event, data = _event_body()
    room = services().publisher.publish_to_user(user_id, event, data, SOURCE)
    return {"status": "accepted", "room": room}, 202


@bp.post("/users/<user_id>/disconnect")
@require_api_key
def disconnect_user(user_id: str) -> Any:
    """Disconnect every socket of the user."""
    services().publisher.disconnect_user(user_id, SOURCE)
    return {"status": "accepted", "room": f"user.{user_id}"}, 202
