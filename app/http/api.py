"""The server API under ``/api/v1/``: publish, publish in batches, disconnect a user, presence.

The README's "Publishing over HTTP" is this module's documentation.

A plain WSGI application in front of Flask, not a blueprint: publishing is
the hottest request orgcast serves, and on the 50 rooms × 100 sockets
benchmark Flask's request handling (request and response objects, routing,
the app context) cost about 0.3 ms of the 1.35 ms of server CPU a publish of
100 deliveries took — more than the JSON, the key check and the bus
together. The routes here use the same key check, the same validation (the
``Publisher``) and the same JSON errors (``errors.http_error``) as the rest;
any other path goes on to Flask.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from app.errors import ApiError, Unavailable, http_error, http_error_headers, status_line
from app.http.apikey import check_api_key
from app.publish.service import Event, Publisher, idempotency_key, new_id

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

PREFIX = "/api/v1/"
SOURCE = "http"
#: most events one batch may carry
MAX_BATCH = 1000

_ORGANIZATION_EVENTS = re.compile(r"organizations/([^/]+)/events")
_USER_EVENTS = re.compile(r"users/([^/]+)/events")
_USER_DISCONNECT = re.compile(r"users/([^/]+)/disconnect")
_REVOKE = re.compile(r"organizations/([^/]+)/users/([^/]+)/revoke")
_ORGANIZATION_PRESENCE = re.compile(r"organizations/([^/]+)/presence")
_USER_PRESENCE = re.compile(r"users/([^/]+)/presence")
#: a request id a client (or nginx's $request_id) may give in X-Request-Id
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


class Presence(Protocol):
    def organization(self, organization_id: str) -> dict[str, Any]: ...
    def user(self, user_id: str) -> dict[str, Any]: ...


class Observer(Protocol):
    """Told of every request refused (the metrics implement it)."""

    def refused(self, code: str) -> None: ...


class ServerApi:
    """The ``/api/v1/`` routes, mounted before ``fallback`` (Flask)."""

    def __init__(self, publisher: Publisher, api_keys: tuple[str, ...], max_payload: int,
                 fallback: WSGIApp, presence: Presence | None = None, observer: Observer | None = None) -> None:
        self._observer = observer
        self._publisher = publisher
        self._keys = api_keys
        self._limit = max_payload
        self._fallback = fallback
        self._presence = presence
        # (path, method, handler, status of a success)
        self._routes: list[tuple[re.Pattern[str], str, Callable[[dict[str, Any], str], Any], int]] = [
            (_ORGANIZATION_EVENTS, "POST", self._publish_to_organization, 202),
            (_USER_EVENTS, "POST", self._publish_to_user, 202),
            (_USER_DISCONNECT, "POST", self._disconnect_user, 202),
            (_REVOKE, "POST", self._revoke, 202),
            (re.compile("events"), "POST", self._publish_batch, 202),
            (_ORGANIZATION_PRESENCE, "GET", self._organization_presence, 200),
            (_USER_PRESENCE, "GET", self._user_presence, 200),
        ]

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if not path.startswith(PREFIX):
            return self._fallback(environ, start_response)
        rest = path[len(PREFIX):]
        for pattern, method, handler, success in self._routes:
            match = pattern.fullmatch(rest)
            if match is None:
                continue
            if environ.get("REQUEST_METHOD") != method:
                body, headers = _error(405, "method_not_allowed")
                return _respond(start_response, 405, body, [*headers, ("Allow", method)])
            given = environ.get("HTTP_X_REQUEST_ID", "")
            request_id = environ["orgcast.request_id"] = given if _REQUEST_ID.fullmatch(given) else new_id()
            tag = [("X-Request-Id", request_id)]
            try:
                check_api_key(environ.get("HTTP_AUTHORIZATION", ""), self._keys)
                ident = "/".join(_path_text(g) for g in match.groups()) if match.groups() else ""
                return _respond(start_response, success, handler(environ, ident), tag)
            except (ApiError, Unavailable) as exc:
                status = exc.status if isinstance(exc, ApiError) else 503
                code = exc.code if isinstance(exc, ApiError) else "unavailable"
                if self._observer is not None:
                    self._observer.refused(code)
                body, headers = _error(status, code, exc.message)
                return _respond(start_response, status, body, [*headers, *tag])
        return _respond(start_response, 404, *_error(404, "not_found"))

    # --- routes

    def _publish_to_organization(self, environ: dict[str, Any], organization_id: str) -> dict[str, Any]:
        key = idempotency_key(environ.get("HTTP_IDEMPOTENCY_KEY"))
        event, data = _event(self._json_body(environ))
        room, repeat = self._publisher.publish_to_organization(organization_id, event, data, SOURCE,
                                                               environ["orgcast.request_id"], key)
        return _accepted({"status": "accepted", "room": room}, repeat)

    def _publish_to_user(self, environ: dict[str, Any], user_id: str) -> dict[str, Any]:
        key = idempotency_key(environ.get("HTTP_IDEMPOTENCY_KEY"))
        event, data = _event(self._json_body(environ))
        room, repeat = self._publisher.publish_to_user(user_id, event, data, SOURCE, environ["orgcast.request_id"],
                                                       key)
        return _accepted({"status": "accepted", "room": room}, repeat)

    def _disconnect_user(self, environ: dict[str, Any], user_id: str) -> dict[str, Any]:
        room = self._publisher.disconnect_user(user_id, f"{SOURCE} [{environ['orgcast.request_id']}]")
        return {"status": "accepted", "room": room}

    def _revoke(self, environ: dict[str, Any], ids: str) -> dict[str, Any]:
        organization_id, _, user_id = ids.partition("/")
        room = self._publisher.revoke(organization_id, user_id, f"{SOURCE} [{environ['orgcast.request_id']}]")
        return {"status": "accepted", "room": room, "userId": user_id}

    def _organization_presence(self, environ: dict[str, Any], organization_id: str) -> dict[str, Any]:
        self._publisher.organization_room(organization_id)  # invalid_organization
        if self._presence is None:
            raise ApiError("not_found")
        return self._presence.organization(organization_id)

    def _user_presence(self, environ: dict[str, Any], user_id: str) -> dict[str, Any]:
        self._publisher.user_room(user_id)  # invalid_user
        if self._presence is None:
            raise ApiError("not_found")
        return self._presence.user(user_id)

    def _publish_batch(self, environ: dict[str, Any], _: str) -> dict[str, Any]:
        body = self._json_body(environ)
        items = body.get("events") if isinstance(body, dict) else None
        if not isinstance(items, list) or not items:
            raise ApiError("bad_request", 'The body must be {"events": [...]} with at least one event.')
        if len(items) > MAX_BATCH:
            raise ApiError("bad_request", f"A batch holds at most {MAX_BATCH} events.")
        # All validated first: one bad event refuses the whole batch. The header's key
        # keys each event that has none of its own as "<key>:<index>".
        key = idempotency_key(environ.get("HTTP_IDEMPOTENCY_KEY"))
        events = [self._batch_event(index, item, key) for index, item in enumerate(items)]
        count, repeats = self._publisher.publish_many(events, SOURCE, environ["orgcast.request_id"])
        answer: dict[str, Any] = {"status": "accepted", "count": count}
        if repeats:
            answer["duplicates"] = repeats
        return _accepted(answer, repeats == count)

    def _batch_event(self, index: int, item: Any, batch_key: str | None = None) -> Event:
        where = f"events[{index}]"
        if not isinstance(item, dict) or "event" not in item:
            raise ApiError("bad_request", f'{where} must be an object with an "event".')
        targets = [key for key in ("organizationId", "userId") if key in item]
        if len(targets) != 1 or not isinstance(item[targets[0]], str):
            raise ApiError("bad_request", f'{where} must name one "organizationId" or one "userId" (a string).')
        try:
            if targets[0] == "organizationId":
                room = self._publisher.organization_room(item["organizationId"])
            else:
                room = self._publisher.user_room(item["userId"])
            event = self._publisher.prepare(room, item["event"], item.get("data"), item.get("idempotencyKey"))
            if event.key is None and batch_key is not None:
                event = Event(event.room, event.args, f"{batch_key}:{index}")
            return event
        except ApiError as exc:
            raise ApiError(exc.code, f"{where}: {exc.message}") from None

    # --- body

    def _json_body(self, environ: dict[str, Any]) -> Any:
        """Read and parse the JSON body, bounded by ORGCAST_MAX_PAYLOAD.

        :raise ApiError: payload_too_large, bad_request
        """
        stream = environ["wsgi.input"]
        length = environ.get("CONTENT_LENGTH") or ""
        try:
            if length:
                if not length.isdigit():
                    raise ApiError("bad_request", "Content-Length is not a number.")
                if int(length) > self._limit:
                    # Read (and drop) a body of up to 16 times the limit (and at least nginx's
                    # default client_max_body_size, 1 MiB) before answering: a proxy still
                    # sending it would otherwise meet a closed connection and answer 502
                    # instead of this 413 (issue 18). Bigger ones are cut short.
                    _discard(stream, int(length), max(16 * self._limit, DISCARD_AT_LEAST))
                    raise ApiError("payload_too_large")
                raw = stream.read(int(length))
                if len(raw) < int(length):
                    raise ApiError("bad_request", "The body ended before its Content-Length.")
            else:
                # Chunked (the server ends the stream): read one byte past the limit to know.
                raw = stream.read(self._limit + 1)
                if len(raw) > self._limit:
                    raise ApiError("payload_too_large")
        except OSError:  # the client went away, or ORGCAST_BODY_TIMEOUT cut it off
            raise ApiError("bad_request", "The body did not arrive whole.") from None
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested too deeply
            raise ApiError("bad_request") from None


def _accepted(body: dict[str, Any], repeat: bool) -> dict[str, Any]:
    """The answer to a publish; a repeat of an idempotency key is answered as the first, plus duplicate."""
    if repeat:
        body["duplicate"] = True
    return body


#: bytes of an oversized body read and dropped before the 413, whatever the limit
DISCARD_AT_LEAST = 1048576


def _discard(stream: Any, length: int, most: int) -> None:
    """Read and drop ``length`` bytes of a body, if there are at most ``most`` of them."""
    if length > most:
        return
    while length > 0:
        chunk = stream.read(min(65536, length))
        if not chunk:
            return
        length -= len(chunk)


def _event(body: Any) -> tuple[Any, Any]:
    """(event, data) of a publish body; a body without ``data`` publishes ``null``.

    :raise ApiError: bad_request
    """
    if not isinstance(body, dict) or "event" not in body:
        raise ApiError("bad_request")
    return body["event"], body.get("data")


def _path_text(segment: str) -> str:
    # WSGI gives the path as latin-1 characters of its bytes; ids are UTF-8.
    try:
        return segment.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return segment


def _error(status: int, code: str, message: str | None = None) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    _, body = http_error(status, code, message)
    return body, list(http_error_headers(status).items())


def _respond(start_response: Callable[..., Any], status: int, body: dict[str, Any],
             headers: list[tuple[str, str]] | None = None) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(status_line(status), [("Content-Type", "application/json"),
                                         ("Content-Length", str(len(data))), *(headers or [])])
    return [data]
