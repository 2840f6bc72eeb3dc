"""Every private name of a library that orgcast overrides or reads, in one list.

python-engineio, python-socketio, gevent, gevent-websocket and gunicorn do
not promise these; setup.cfg bounds their versions to the releases the suite
ran on, and this test says which name went missing when one moves, instead
of a worker failing at its first request.
"""

from __future__ import annotations

import importlib
from typing import Any

import pytest

# (module, class or attribute path, the names orgcast relies on, where)
CLASS_NAMES: list[tuple[str, str, tuple[str, ...], str]] = [
    ("engineio", "Server", (
        "_bad_request", "_ok", "_handle_connect", "_cors_allowed_origins", "_cors_headers",
        "_trigger_event", "_service_task", "_upgrades", "_gzip", "_deflate", "compression_methods",
        "generate_id", "get_queue_empty_exception", "handle_request", "disconnect", "reason",
        "start_background_task"), "app/transport/engine.py"),
    ("engineio.socket", "Socket", (
        "poll", "send", "receive", "close", "handle_get_request", "handle_post_request",
        "_upgrade_websocket", "_websocket_handler", "schedule_ping", "check_ping_timeout",
        "upgrade_protocols"), "app/transport/engine.py"),
    ("socketio", "Server", (
        "_engineio_server_class", "_handle_eio_connect", "_handle_eio_message",
        "_handle_eio_disconnect", "_handle_connect", "_handle_disconnect", "_handle_event",
        "_handle_ack", "_send_packet", "disconnect", "emit", "enter_room"), "app/transport/server.py"),
    ("socketio", "Manager", (
        "sid_from_eio_sid", "eio_sid_from_sid", "get_participants", "is_connected", "pre_connect"),
     "app/transport/server.py, app/realtime/fanout.py"),
    ("socketio", "Namespace", ("trigger_event", "enter_room"), "app/realtime/namespace.py"),
    ("gevent.pywsgi", "WSGIHandler", (
        "handle_one_request", "read_request", "handle_one_response", "start_response",
        "run_application", "_handle_client_error", "handle_error", "log_request", "write",
        "process_result", "get_environ"), "app/serving.py"),
    ("gevent.pywsgi", "Input", ("_discard",), "app/serving.py"),
    ("geventwebsocket.websocket", "WebSocket", (
        "OPCODE_CONTINUATION", "_is_valid_close_code", "handle_close"), "app/transport/websocket.py"),
    ("geventwebsocket.websocket", "Header", ("decode_header",), "app/transport/websocket.py"),
    ("gunicorn.workers.ggevent", "GeventPyWSGIWorker", (
        "wsgi_handler", "server_class", "init_process", "run"), "app/serving.py"),
    ("gunicorn.workers.ggevent", "PyWSGIHandler", ("log_request", "get_environ"), "app/serving.py"),
    ("gunicorn.glogging", "Logger", ("setup", "atoms", "access"), "app/serving.py"),
]

# Slots (instance fields) whose names orgcast reads or sets.
SLOTS: list[tuple[str, str, tuple[str, ...], str]] = [
    ("gevent.pywsgi", "Input", ("position", "content_length", "chunked_input", "chunk_length",
                                "_chunked_input_error"), "app/serving.py: _body_complete"),
    ("geventwebsocket.websocket", "WebSocket", ("closed", "stream", "raw_write", "raw_read",
                                                "environ", "handler"), "app/transport/websocket.py"),
    ("geventwebsocket.websocket", "Header", ("fin", "mask", "opcode", "flags", "length"),
     "app/transport/websocket.py"),
]

# Module-level names.
MODULE_NAMES: list[tuple[str, tuple[str, ...], str]] = [
    ("engineio.packet", ("Packet", "OPEN", "CLOSE", "PING", "PONG", "MESSAGE", "UPGRADE", "NOOP"),
     "app/transport/engine.py"),
    ("engineio.exceptions", ("EngineIOError", "QueueEmpty"), "app/transport/engine.py"),
    ("socketio.packet", ("Packet", "CONNECT", "DISCONNECT", "EVENT", "ACK", "CONNECT_ERROR",
                         "BINARY_EVENT", "BINARY_ACK"), "app/transport/server.py"),
    ("geventwebsocket.websocket", ("Stream",), "app/serving.py"),
    ("geventwebsocket.exceptions", ("ProtocolError", "WebSocketError"), "app/transport/websocket.py"),
    ("gunicorn.workers.ggevent", ("GeventResponse",), "app/serving.py"),
    ("gevent.socket", ("wait_write",), "app/transport/websocket.py"),
]


def _resolve(module: str, path: str) -> Any:
    obj: Any = importlib.import_module(module)
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize(("module", "path", "names", "where"), CLASS_NAMES,
                         ids=[f"{m}.{p}" for m, p, _, _ in CLASS_NAMES])
def test_overridden_and_read_methods_exist(module: str, path: str, names: tuple[str, ...],
                                           where: str) -> None:
    cls = _resolve(module, path)
    missing = [n for n in names if not hasattr(cls, n)]
    assert not missing, f"{module}.{path} no longer has {missing} (used by {where})"


@pytest.mark.parametrize(("module", "path", "names", "where"), SLOTS,
                         ids=[f"{m}.{p}" for m, p, _, _ in SLOTS])
def test_slots_read_and_set_exist(module: str, path: str, names: tuple[str, ...], where: str) -> None:
    cls = _resolve(module, path)
    slots = {s for klass in cls.__mro__ for s in getattr(klass, "__slots__", ())}
    missing = [n for n in names if n not in slots]
    assert not missing, f"{module}.{path} no longer has the slots {missing} (used by {where})"


@pytest.mark.parametrize(("module", "names", "where"), MODULE_NAMES, ids=[m for m, _, _ in MODULE_NAMES])
def test_module_names_exist(module: str, names: tuple[str, ...], where: str) -> None:
    mod = importlib.import_module(module)
    missing = [n for n in names if not hasattr(mod, n)]
    assert not missing, f"{module} no longer has {missing} (used by {where})"


def test_engineio_instance_attributes_exist() -> None:
    """Attributes python-engineio sets in __init__, which orgcast reads or sets."""
    import engineio
    from engineio import socket as eio_socket

    server = engineio.Server(async_mode="gevent", logger=False)
    for name in ("sockets", "handlers", "start_service_task", "service_task_handle", "ping_interval",
                 "ping_timeout", "ping_interval_grace_period", "max_http_buffer_size", "transports",
                 "cors_allowed_origins", "http_compression", "compression_threshold", "_async"):
        assert hasattr(server, name), f"engineio.Server() has no {name} (used by app/transport/engine.py)"
    assert "websocket" in server._async and "queue" in server._async
    sock = eio_socket.Socket(server, "sid")
    for name in ("queue", "upgrading", "upgraded", "connected", "closed", "closing", "last_ping",
                 "sid", "server"):
        assert hasattr(sock, name), f"engineio Socket() has no {name} (used by app/transport/engine.py)"


def test_socketio_instance_attributes_exist() -> None:
    import socketio

    server = socketio.Server(async_mode="gevent")
    for name in ("eio", "manager", "environ", "packet_class", "reason", "not_handled", "handlers",
                 "namespace_handlers"):
        assert hasattr(server, name), f"socketio.Server() has no {name} (used by app/transport/server.py)"
    assert hasattr(server.manager, "rooms"), "socketio Manager has no rooms (used by app/realtime/fanout.py)"


def test_gevent_socket_has_the_raw_socket_and_the_hub_its_printer() -> None:
    import gevent
    import gevent.socket

    a, b = gevent.socket.socketpair()
    try:
        assert hasattr(a, "_sock"), "gevent sockets no longer hold _sock (app/transport/websocket.py)"
        assert a._sock.gettimeout() == 0.0, "gevent's raw socket is not non-blocking any more"
    finally:
        a.close()
        b.close()
    assert hasattr(gevent.get_hub(), "print_exception"), "gevent's hub has no print_exception (app/serving.py)"
    assert hasattr(gevent.get_hub().loop, "timer")


def test_gunicorn_logger_has_its_two_loggers() -> None:
    from gunicorn.config import Config
    from gunicorn.glogging import Logger

    logger = Logger(Config())
    for name in ("error_log", "access_log"):
        assert hasattr(logger, name), f"gunicorn's Logger has no {name} (app/serving.py: RedactingLogger)"
