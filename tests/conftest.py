"""Fixtures: real Postgres and Redis started from the installed binaries, the
app built from explicit settings, and the real gunicorn process.

Tokens in tests/data.sql: tok-alice, tok-bob (org-a), tok-carol (org-b),
tok-dave (org-a and org-b), tok-expired (alice, expired an hour ago).
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import socketio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from throwaway import ThrowawayPostgres, ThrowawayRedis, free_port, terminate, wait_port  # noqa: E402

API_KEY = "test-api-key-0123456789"
GUNICORN = str(Path(sys.executable).parent / "gunicorn")


# --- services -----------------------------------------------------------------


@contextmanager
def fresh_database() -> Iterator[ThrowawayPostgres]:
    """A throwaway Postgres with the application's schema and the test data."""
    pg = ThrowawayPostgres().start()
    try:
        pg.load(ROOT / "scripts" / "schema.sql")
        pg.load(ROOT / "tests" / "data.sql")
        yield pg
    finally:
        pg.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[ThrowawayPostgres]:
    """The suite's database; orgcast's own schema is in it too, for the apps built in-process
    (whose bus listener, which creates it, never starts). ``fresh_database`` has none."""
    from app.bus.postgres import SCHEMA_SQL

    with fresh_database() as pg:
        pg.psql(SCHEMA_SQL)
        yield pg


@pytest.fixture(scope="session")
def redis_server() -> Iterator[ThrowawayRedis]:
    server = ThrowawayRedis().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def clean_environ() -> Iterator[None]:
    """Restore os.environ after each test."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


# --- the app in-process (HTTP logic) -------------------------------------------


def base_env(postgres: ThrowawayPostgres, **overrides: str) -> dict[str, str]:
    """The environment of a test deployment: test database, one API key."""
    env = {"DATABASE_URL": postgres.dsn, "ORGCAST_API_KEYS": API_KEY,
           "ORGCAST_AUTH_CACHE_TTL": "0",
           # Every test client comes from 127.0.0.1: the per-address limits are
           # tested on their own (tests/test_lifecycle.py).
           "ORGCAST_AUTH_FAILURES": "100000", "ORGCAST_MAX_PENDING_PER_ADDRESS": "100000"}
    env.update(overrides)
    return env


@pytest.fixture
def settings(postgres: ThrowawayPostgres) -> Any:
    from app.config import load_settings

    return load_settings(base_env(postgres))


@pytest.fixture
def app(settings: Any) -> Any:
    from app import create_app

    return create_app(settings)


@pytest.fixture
def client(app: Any) -> Any:
    """An in-process HTTP client of the whole WSGI callable (server API, Socket.IO, Flask)."""
    from werkzeug.test import Client

    return Client(app)


# --- the real gunicorn process --------------------------------------------------


@dataclass
class Server:
    """A running ``gunicorn -c gunicorn.conf.py wsgi:app``."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        """Everything gunicorn and the app wrote so far (stdout and stderr)."""
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        terminate(self.proc, 15)


def start_gunicorn(env: dict[str, str], tmp_path: Path, timeout: float = 20.0,
                   ready: bool = True) -> Server:
    """Start gunicorn on a free port; wait until /readyz answers 200 (/healthz with
    ``ready=False``), or fail with its output."""
    import requests

    port = free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("ORGCAST_", "REDIS_"))}
    full_env.update(env)
    full_env["BIND"] = f"127.0.0.1:{port}"
    full_env.setdefault("WEB_CONCURRENCY", "1")
    log_path = tmp_path / f"gunicorn-{port}.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([GUNICORN, "-c", "gunicorn.conf.py", "wsgi:app"], cwd=ROOT,
                                env=full_env, stdout=out, stderr=subprocess.STDOUT)
    server = Server(proc, port, log_path, full_env)
    deadline = time.monotonic() + timeout
    try:
        wait_port(port, deadline, proc)
        while time.monotonic() < deadline:
            try:
                if requests.get(server.url + ("/readyz" if ready else "/healthz"),
                                timeout=1).status_code == 200:
                    return server
            except requests.RequestException:
                pass
            if proc.poll() is not None:
                break
            time.sleep(0.05)
    except (TimeoutError, RuntimeError):
        pass
    server.stop()
    pytest.fail(f"gunicorn did not start:\n{server.output()}")


@pytest.fixture
def gunicorn_factory(tmp_path: Path) -> Iterator[Any]:
    """Start gunicorn processes with given environments; stop them after the test."""
    started: list[Server] = []

    def factory(env: dict[str, str], ready: bool = True) -> Server:
        server = start_gunicorn(env, tmp_path, ready=ready)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def gunicorn_server(postgres: ThrowawayPostgres, tmp_path_factory: Any) -> Iterator[Server]:
    """One gunicorn for a whole test module (default settings, test database)."""
    server = start_gunicorn(base_env(postgres), tmp_path_factory.mktemp("gunicorn"))
    yield server
    server.stop()


# --- Socket.IO clients -----------------------------------------------------------


class Listener:
    """A python-socketio Client that records what it receives, for waiting on."""

    def __init__(self) -> None:
        self.client = socketio.Client(reconnection=False)
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.connect_error: Any = None
        self._settled = threading.Event()
        self.client.on("connect", self._on_connect)
        self.client.on("connect_error", self._on_connect_error)
        self.client.on("disconnect", lambda *a: self.events.put(("disconnect", a)))
        self.client.on("*", lambda event, *args: self.events.put((event, args[0] if args else None)))

    def _on_connect(self) -> None:
        self._settled.set()

    def _on_connect_error(self, data: Any) -> None:
        self.connect_error = data
        # python-engineio's polling client races on a refusal: if the server
        # answers before the POST that carried CONNECT returns, connect()'s
        # disconnect() flips the state while that POST is in flight, the write
        # loop exits without sending CLOSE, and disconnect() then waits for a
        # long-poll GET that the server holds for its ping interval (25 s).
        # Let that POST finish first (this runs before connect() resumes).
        send_queue = self.client.eio.queue
        deadline = time.monotonic() + 5
        while send_queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)
        self._settled.set()

    def connect(self, url: str, transports: list[str] | None = None, **kwargs: Any) -> Listener:
        try:
            self.client.connect(url, transports=transports or ["websocket"], wait_timeout=10,
                                **kwargs)
        except socketio.exceptions.ConnectionError:
            pass  # the refusal is in connect_error
        assert self._settled.wait(10), "neither connect nor connect_error within 10 s"
        return self

    @property
    def refusal_code(self) -> str | None:
        data = self.connect_error
        return (data or {}).get("data", {}).get("code") if isinstance(data, dict) else None

    def wait_for(self, event: str, timeout: float = 5.0) -> Any:
        """Return the data of the next ``event``; fail after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {event!r} within {timeout} s")
            try:
                name, data = self.events.get(timeout=remaining)
            except queue.Empty:
                raise AssertionError(f"no {event!r} within {timeout} s") from None
            if name == event:
                return data

    def events_before(self, event: str, data: Any, timeout: float = 5.0) -> list[tuple[str, Any]]:
        """Return, in order, every event received before ``event`` carrying ``data``.

        The barrier that proves absence without sleeping: publish a marker
        after the events under test; one process sends a socket's events in
        order, so what is missing when the marker arrives was not delivered.
        """
        out: list[tuple[str, Any]] = []
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {event!r} {data!r} within {timeout} s; got {out}")
            try:
                item = self.events.get(timeout=remaining)
            except queue.Empty:
                continue
            if item == (event, data):
                return out
            out.append(item)

    def drain(self) -> list[tuple[str, Any]]:
        """Return every event received so far (after a marker barrier, never a sleep)."""
        out = []
        while True:
            try:
                out.append(self.events.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        if self.client.connected:
            self.client.disconnect()


@pytest.fixture
def listen() -> Iterator[Any]:
    """Connect Listeners; disconnect them all after the test."""
    opened: list[Listener] = []

    def connect(url: str, **kwargs: Any) -> Listener:
        listener = Listener()
        opened.append(listener)
        return listener.connect(url, **kwargs)

    yield connect
    for listener in opened:
        listener.close()


@pytest.fixture
def no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves threads running (e.g. a Socket.IO client not closed)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5
    while True:
        leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert not leaked, f"threads left running: {[t.name for t in leaked]}"


# --- the official socket.io-client (Node.js) ------------------------------------

NODE_MODULES = ROOT / ".cache" / "npm" / "node_modules"
CLIENT = ROOT / "tests" / "js" / "client.js"


class JsClient:
    """A Node.js socket.io-client process whose JSON lines we can wait on."""

    def __init__(self, url: str, options: dict[str, Any]) -> None:
        node = shutil.which("node")
        assert node, "node is required (Debian package nodejs)"
        assert (NODE_MODULES / "socket.io-client").is_dir(), "run make to fetch socket.io-client"
        self.proc = subprocess.Popen(
            [node, str(CLIENT), url, json.dumps(options)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={"NODE_PATH": str(NODE_MODULES), "PATH": "/usr/bin:/bin"})
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.lines.put(json.loads(line))
            except ValueError:
                self.lines.put({"type": "output", "text": line})

    def next(self, *types: str, timeout: float = 10.0) -> dict[str, Any]:
        """Return the next line of one of ``types``; fail after ``timeout``."""
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no {types} from the JS client within {timeout} s") from None
            if line["type"] in types:
                return line

    def command(self, line: str) -> None:
        """Send one command line to the client (see tests/js/client.js)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write("close\n")
                self.proc.stdin.flush()
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()
        self._reader.join(5)


@pytest.fixture
def js_client() -> Iterator[Any]:
    started: list[JsClient] = []

    def start(url: str, **options: Any) -> JsClient:
        client = JsClient(url, options)
        started.append(client)
        return client

    yield start
    for client in started:
        client.close()



def event_data(line: dict[str, Any]) -> list[Any]:
    """The arguments of a JS client's event without the offset recovery appends (a string, last)."""
    args = list(line["args"])
    assert args and isinstance(args[-1], str), f"no offset as the last argument: {args}"
    return args[:-1]


# --- shared helpers ---------------------------------------------------------------

TRANSPORTS = [pytest.param(["websocket"], id="websocket"), pytest.param(["polling"], id="polling")]

_serial = itertools.count()


@pytest.fixture(params=TRANSPORTS)
def transports(request: pytest.FixtureRequest) -> list[str]:
    """Each test that asks for it runs over websocket and over long-polling."""
    return list(request.param)


def unique(label: str) -> str:
    """A value no other test publishes, to tell events apart."""
    return f"{label}-{next(_serial)}"


def raw_exchange(server: Server, data: bytes, half_close: bool = True) -> bytes:
    """Send ``data`` on a new TCP connection; return what comes back until the server closes."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(data)
        if not half_close:
            return b""
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while len(received) < 1_000_000:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
        return received


def rss_kib(pid: int) -> int:
    """Resident memory of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def publish(server: Server, org: str, event: str = "news", data: Any = None,
            key: str = API_KEY) -> Any:
    """POST an event to an organization through the server API."""
    import requests

    return requests.post(f"{server.url}/api/v1/organizations/{org}/events",
                         json={"event": event, "data": data},
                         headers={"Authorization": f"Bearer {key}"}, timeout=10)
