"""Build the python-socketio server and the WSGI callable around it."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

import engineio
import socketio

from app.config import Settings
from app.errors import API_ERRORS, error_body

SOCKETIO_PATH = "socket.io"

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def build_server(settings: Settings, client_manager: socketio.Manager | None) -> socketio.Server:
    """Return a gevent-mode Socket.IO server configured from the settings."""
    origins: str | list[str] | None
    if settings.cors_origins == ("*",):
        origins = "*"
    else:
        origins = list(settings.cors_origins) or None  # None: same origin only
    return _Server(
        async_mode="gevent",
        client_manager=client_manager,
        cors_allowed_origins=origins,
        max_http_buffer_size=settings.max_payload,
        transports=list(settings.effective_transports),
        always_connect=False,
        # Loggers, not False: given False, python-socketio and python-engineio
        # each add a plain stderr handler of their own, which bypasses
        # redaction (app/log.py configures these two).
        logger=logging.getLogger("socketio"),
        engineio_logger=logging.getLogger("engineio"),
    )


class _EngineIOServer(engineio.Server):  # type: ignore[misc]
    """python-engineio's server, without a hang on garbage from polling clients.

    A polling POST with an unknown packet type (``6``) or a body over
    ``max_http_buffer_size`` makes engineio call ``disconnect(sid)``, which
    closes with ``wait=True``: it waits for a GET to drain the session's
    queue. A client that sent garbage never sends it, so the request greenlet
    (and its slot of gunicorn's worker_connections) was held forever.
    """

    # Every HTTP error is JSON, Engine.IO's own included (they were text/plain):
    # {"error": {"code", "message"}} with engineio's message.
    def _bad_request(self, message: str | None = None) -> dict[str, Any]:
        return _json_error("400 BAD REQUEST", "bad_request", message)

    def _method_not_found(self) -> dict[str, Any]:
        return _json_error("405 METHOD NOT ALLOWED", "method_not_allowed", None)

    def _unauthorized(self, message: str | None = None) -> dict[str, Any]:
        return _json_error("401 UNAUTHORIZED", "unauthorized", message)

    def disconnect(self, sid: str | None = None) -> None:
        sock = self.sockets.get(sid) if sid is not None else None
        if sock is not None and not sock.upgraded:
            # A GET already waiting still receives the CLOSE packet.
            sock.close(wait=False, reason=self.reason.SERVER_DISCONNECT)
            self.sockets.pop(sid, None)
            return
        super().disconnect(sid)


def _json_error(status: str, code: str, message: str | None) -> dict[str, Any]:
    """An engineio response dict carrying orgcast's JSON error body."""
    body = json.dumps(error_body(code, message)).encode()
    return {"status": status, "headers": [("Content-Type", "application/json")], "response": body}


class _Server(socketio.Server):  # type: ignore[misc]
    """python-socketio's server on ``_EngineIOServer``."""

    def _engineio_server_class(self) -> type[engineio.Server]:
        return _EngineIOServer


def build_wsgi(sio: socketio.Server, flask_app: WSGIApp, settings: Settings) -> WSGIApp:
    """Mount Socket.IO beside Flask in one WSGI callable."""
    app: WSGIApp = socketio.WSGIApp(sio, flask_app, socketio_path=SOCKETIO_PATH)
    if "polling" not in settings.effective_transports:
        app = _refuse_polling(app)
    return app


def _refuse_polling(app: WSGIApp) -> WSGIApp:
    """Answer polling requests with a clear JSON 400 instead of 'Invalid transport'.

    With several workers a polling session's requests land on different
    processes and would meet ``400 Invalid session`` (contract 3).
    """
    prefix = "/" + SOCKETIO_PATH
    entry = API_ERRORS["polling_disabled"]
    body = json.dumps(error_body(entry.code)).encode()

    def middleware(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "").startswith(prefix):
            transport = parse_qs(environ.get("QUERY_STRING", "")).get("transport", [""])[0]
            if transport == "polling":
                start_response(f"{entry.status} Bad Request", [
                    ("Content-Type", "application/json"),
                    ("Content-Length", str(len(body))),
                ])
                return [body]
        return app(environ, start_response)

    return middleware
