"""The closed tables of codes, and the exception tree that carries them.

::

    OrgcastError
     ├── Refusal(code)        a connect / subscribe / refresh is refused
     │    └── Unavailable     the database (or Redis) could not answer in time
     └── ApiError(code)       a server-API request is refused

The tables are the README's "Refusal codes" and "Publishing over HTTP"
error tables. Services raise these; only the edges turn them into wire
form, each through one function here: ``http_error`` (the JSON body of
every HTTP error), ``connect_error`` (a Socket.IO CONNECT_ERROR payload),
``ack_error`` (the ack of a refused ``subscribe`` or ``refresh``).
"""

from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus
from typing import Any


@dataclass(frozen=True)
class Code:
    """One code of a table: what the client sees and whether to retry."""

    code: str
    message: str
    status: int
    retryable: bool = False


#: Connection refusals, in the order the connect check tests them.
REFUSALS: dict[str, Code] = {
    c.code: c
    for c in (
        Code("token_missing", "No access token: send auth.token, ?token= or Authorization: Bearer.", 401),
        Code("organization_missing", "No organizationId: send auth.organizationId or ?organizationId=.", 400),
        Code("organization_invalid", "organizationId must be 1-64 characters of A-Z a-z 0-9 _ -.", 400),
        Code("token_invalid", "The access token is unknown; log in again.", 401),
        Code("token_expired", "The access token has expired; log in again.", 401),
        Code("forbidden", "This user is not a member of the organization.", 403),
        Code("rate_limited", "Too many failed attempts from this address; retry later.", 429, True),
        Code("unavailable", "The authorization database did not answer in time; retry.", 503, True),
        Code("namespace_invalid", "Invalid namespace: orgcast serves the namespace \"/\" only.", 400),
        Code("rewind_invalid", "rewind must be a whole number from 0.", 400),
        Code("too_many_sockets", "This user has the most sockets allowed open; close one first.", 429),
        # subscribe and refresh only (answered in their acks):
        Code("too_many_subscriptions", "This socket listens to the most organizations allowed; "
             "unsubscribe from one first.", 429),
        Code("token_mismatch", "The new token belongs to another user.", 403),
        Code("bad_request", "The payload must be an object with the fields of this event.", 400),
    )
}

#: Server-API errors and the HTTP errors every route may give.
API_ERRORS: dict[str, Code] = {
    c.code: c
    for c in (
        Code("bad_request", "The body must be a JSON object with an \"event\" string.", 400),
        Code("unauthorized", "Missing or wrong API key: send Authorization: Bearer <key>.", 401),
        Code("api_disabled", "The server API is disabled: set ORGCAST_API_KEYS.", 401),
        Code("origin_not_allowed", "This Origin is not allowed: list it in ORGCAST_CORS_ORIGINS.", 403),
        Code("not_found", "No such route.", 404),
        Code("method_not_allowed", "Method not allowed on this route.", 405),
        Code("payload_too_large", "The body is larger than ORGCAST_MAX_PAYLOAD.", 413),
        Code("unsupported_media_type", "Send the body as application/json.", 415),
        Code("invalid_organization", "Organization ids are 1-64 characters of A-Z a-z 0-9 _ -.", 422),
        Code("invalid_user", "User ids are 1-80 printable characters without spaces.", 422),
        Code("invalid_room", "Rooms are organization.<id> or user.<id>.", 422),
        Code("invalid_event", "Event names are 1-64 printable characters and not reserved by Socket.IO.", 422),
        Code("invalid_idempotency_key", "Idempotency keys are 1-64 characters of A-Z a-z 0-9 . _ : -.", 422),
        Code("polling_disabled",
             "Long-polling is off in this deployment (several workers): connect with transports: [\"websocket\"].",
             400),
        Code("rate_limited", "Too many requests from this address; retry later.", 429, True),
        Code("unavailable", "A dependency did not answer in time; retry.", 503, True),
        Code("internal_error", "Internal error.", 500, True),
    )
}


def error_body(code: str, message: str | None = None) -> dict[str, Any]:
    """Return the JSON body of an HTTP error: ``{"error": {"code", "message"}}``."""
    return {"error": {"code": code, "message": message or API_ERRORS[code].message}}


def status_line(status: int) -> str:
    """Return a WSGI status line such as ``400 Bad Request``."""
    return f"{status} {HTTPStatus(status).phrase}"


def http_error(status: int, code: str, message: str | None = None) -> tuple[str, dict[str, Any]]:
    """Return (status line, JSON body) of an HTTP error: the HTTP wire form of a code."""
    return status_line(status), error_body(code, message)


def http_error_headers(status: int) -> dict[str, str]:
    """Return the headers an HTTP error of this status carries (401: how to authenticate, 503: when to retry)."""
    if status == 401:
        return {"WWW-Authenticate": "Bearer"}
    if status == 503:
        return {"Retry-After": "1"}
    return {}


def connect_error(code: str, message: str | None = None) -> dict[str, Any]:
    """Return a CONNECT_ERROR payload: ``{"message", "data": {"code"}}``, the Socket.IO wire form."""
    return {"message": message or REFUSALS[code].message, "data": {"code": code}}


def ack_error(code: str, message: str | None = None) -> dict[str, Any]:
    """Return the ack of a refused client event: ``{"ok": false, "code", "message"}``."""
    return {"ok": False, "code": code, "message": message or REFUSALS[code].message}


class OrgcastError(Exception):
    """Base of every error orgcast raises on purpose."""

    table: dict[str, Code] = {}

    def __init__(self, code: str, message: str | None = None) -> None:
        entry = self.table[code]  # KeyError here is a programming error
        self.code = code
        self.message = message or entry.message
        self.status = entry.status
        self.retryable = entry.retryable
        super().__init__(f"{code}: {self.message}")


class Refusal(OrgcastError):
    """A client is refused; ``code`` is one of REFUSALS."""

    table = REFUSALS
    #: the user the credentials belong to, when known (for the logs, never for the client)
    user_id: str | None = None


class Unavailable(Refusal):
    """A dependency did not answer in time; the caller should retry."""

    #: what went wrong, for the log (never for clients)
    detail: str = ""

    def __init__(self, message: str | None = None) -> None:
        super().__init__("unavailable", message)


class ApiError(OrgcastError):
    """A server-API request is refused; ``code`` is one of API_ERRORS."""

    table = API_ERRORS
