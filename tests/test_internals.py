"""Every name orgcast takes from a library's inside is marked where it is used, and still there.

python-engineio, python-socketio, gevent, gevent-websocket, gunicorn and prometheus-client do
not promise their private names, nor the methods orgcast overrides; setup.cfg
bounds their versions to the releases the suite ran on. Each such use in
``app/`` carries a mark, ``# internal: module.Class.name`` (or
``module.Class.{a,b}`` for several), on its line or the line above. This test
collects the marks, so the list cannot drift from the code:

- every mark names something the installed library has (an attribute, a slot
  or a field its class sets on ``self``): an upgrade that moves one fails here
  with the file and line, not at a worker's first request;
- every method or attribute an ``app`` class overrides from a library class is
  marked (found by looking at the classes themselves);
- every private name ``app`` reads that ``app`` does not define is marked;
- no mark names something its file no longer uses.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import io
import pkgutil
import re
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import app

APP = Path(app.__file__).parent
ROOT = APP.parent
MARK = re.compile(r"#\s*internal:\s*(.+?)\s*$")
STDLIB = set(sys.stdlib_module_names) | {"builtins"}


@dataclass(frozen=True)
class Mark:
    file: Path
    line: int
    dotted: str

    @property
    def owner(self) -> str:
        return self.dotted.rsplit(".", 1)[0]

    @property
    def name(self) -> str:
        return self.dotted.rsplit(".", 1)[1]

    def __str__(self) -> str:
        return f"{self.file.relative_to(ROOT)}:{self.line} {self.dotted}"


def _expand(text: str) -> list[str]:
    found = []
    for item in re.split(r",\s*(?![^{]*\})", text):
        match = re.fullmatch(r"([\w.]+)\.\{([\w,\s]+)\}", item.strip())
        if match:
            found += [f"{match[1]}.{name.strip()}" for name in match[2].split(",")]
        else:
            found.append(item.strip())
    return found


def _sources() -> list[Path]:
    return sorted(p for p in APP.rglob("*.py") if "__pycache__" not in p.parts)


def collect_marks() -> list[Mark]:
    marks = []
    for path in _sources():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            found = MARK.search(line)
            if found:
                marks += [Mark(path, number, dotted) for dotted in _expand(found[1])]
    return marks


MARKS = collect_marks()


def _resolve_owner(dotted: str) -> Any:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for part in parts[cut:]:
            obj = getattr(obj, part)
        return obj
    raise ImportError(dotted)


def _has(owner: Any, name: str) -> bool:
    if hasattr(owner, name):
        return True
    if not inspect.isclass(owner):
        return False
    for klass in owner.__mro__:
        if name in getattr(klass, "__slots__", ()):
            return True
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        if re.search(rf"\bself\.{re.escape(name)}\s*(=|:)", source):
            return True  # a field the class sets on its instances
    return False


def test_the_marks_are_found() -> None:
    # a broken pattern would make every test below pass on an empty list
    assert len(MARKS) > 40
    assert any(m.dotted == "engineio.server.Server._handle_connect" for m in MARKS)


@pytest.mark.parametrize("mark", MARKS, ids=str)
def test_every_marked_name_is_still_in_the_library(mark: Mark) -> None:
    try:
        owner = _resolve_owner(mark.owner)
    except (ImportError, AttributeError) as exc:
        pytest.fail(f"{mark}: {mark.owner} is gone ({exc})")
    assert _has(owner, mark.name), f"{mark}: {mark.owner} no longer has {mark.name}"


def _app_classes() -> list[type]:
    classes = []
    for info in pkgutil.walk_packages(app.__path__, "app."):
        module = importlib.import_module(info.name)
        classes += [c for c in vars(module).values() if inspect.isclass(c) and c.__module__ == module.__name__]
    return classes


def _library(klass: type) -> bool:
    top = klass.__module__.split(".")[0]
    return top != "app" and top not in STDLIB


def overrides() -> list[tuple[type, str]]:
    found = []
    for klass in _app_classes():
        bases = [b for b in klass.__mro__[1:] if _library(b)]
        found += [(klass, name) for name in vars(klass)
                  if not name.startswith("__") and any(name in vars(b) for b in bases)]
    return found


def test_every_override_of_a_library_class_is_marked() -> None:
    unmarked = []
    for klass, name in overrides():
        path = Path(inspect.getfile(klass))
        ok = False
        for mark in MARKS:
            if mark.file != path or mark.name != name:
                continue
            try:
                ok = _resolve_owner(mark.owner) in klass.__mro__
            except (ImportError, AttributeError):
                continue
            if ok:
                break
        if not ok:
            unmarked.append(f"{path.relative_to(ROOT)}: {klass.__name__}.{name}")
    assert overrides(), "no override found: the scan is broken"
    assert not unmarked, f"overrides without an '# internal:' mark naming the library class: {unmarked}"


def _code_without_comments(path: Path) -> list[tokenize.TokenInfo]:
    return [t for t in tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
            if t.type not in (tokenize.COMMENT, tokenize.NL)]


def _defined_by_app() -> set[str]:
    names: set[str] = set()
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
    return names


def test_every_private_library_name_read_is_marked() -> None:
    own = _defined_by_app()
    unmarked = []
    for path in _sources():
        marked = {m.name for m in MARKS if m.file == path}
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and node.attr not in own and node.attr not in marked):
                unmarked.append(f"{path.relative_to(ROOT)}:{node.lineno} .{node.attr}")
    assert not unmarked, f"private library names read without an '# internal:' mark: {unmarked}"


def test_no_mark_names_what_its_file_no_longer_uses() -> None:
    stale = []
    for path in {m.file for m in MARKS}:
        used = {t.string for t in _code_without_comments(path) if t.type == tokenize.NAME}
        stale += [str(m) for m in MARKS if m.file == path and m.name not in used]
    assert not stale, f"marks for names the code no longer uses: {stale}"


def test_engineio_instance_attributes_exist() -> None:
    """Attributes python-engineio sets in __init__, which orgcast reads or sets."""
    import engineio
    from engineio import socket as eio_socket

    server = engineio.Server(async_mode="gevent", logger=False)
    for name in ("sockets", "handlers", "start_service_task", "service_task_handle", "ping_interval",
                 "ping_timeout", "ping_interval_grace_period", "max_http_buffer_size", "transports",
                 "cors_allowed_origins", "http_compression", "compression_threshold"):
        assert hasattr(server, name), f"engineio.Server() has no {name} (used by app/transport/engine.py)"
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


def test_gevent_sockets_hold_a_non_blocking_raw_socket() -> None:
    import gevent.socket

    a, b = gevent.socket.socketpair()
    try:
        assert a._sock.gettimeout() == 0.0, "gevent's raw socket is not non-blocking any more"
    finally:
        a.close()
        b.close()


def test_gunicorn_logger_has_its_two_loggers() -> None:
    from gunicorn.config import Config
    from gunicorn.glogging import Logger

    logger = Logger(Config())
    for name in ("error_log", "access_log"):
        assert hasattr(logger, name), f"gunicorn's Logger has no {name} (app/serving.py: RedactingLogger)"
