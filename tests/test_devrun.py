"""``make run``'s runner, scripts/devrun.py, run as a real process.

It starts a throwaway Postgres with the demo data and gunicorn, prints the
demo URL, token and a curl; Ctrl-C stops everything it started.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import ROOT, ThrowawayPostgres, free_port
from throwaway import terminate

DEVRUN = ROOT / "scripts" / "devrun.py"
STARTUP = 60.0  # initdb + Postgres + gunicorn on a slow machine
DUMMY_JS = b"/* stands in for socket.io.min.js */\n"


class DevRun:
    """scripts/devrun.py as a child process, its output collected line by line."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.port = free_port()
        full = {k: v for k, v in os.environ.items()
                if not k.startswith(("ORGCAST_", "REDIS_", "DATABASE_"))}
        full.update(env)
        full["BIND"] = f"127.0.0.1:{self.port}"
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, str(DEVRUN), *args], cwd=ROOT, env=full,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self._cond:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self.lines.append("")  # EOF marker for waiters
            self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = STARTUP) -> re.Match[str]:
        """Return the first output match of ``pattern``; fail with the output on timeout."""
        regex = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = regex.search("\n".join(self.lines))
                if found:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._reader.is_alive():
                    pytest.fail(f"no {pattern!r} in devrun's output:\n" + "\n".join(self.lines))
                self._cond.wait(remaining)

    def stop(self) -> None:
        """Stop what is left (on a failed test) and close the pipe.

        SIGINT first, so that devrun stops gunicorn and removes its Postgres
        as a user's Ctrl-C would; SIGKILL only if that does not work.
        """
        terminate(self.proc, 30, signal.SIGINT)
        self._reader.join(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@pytest.fixture
def devrun() -> Iterator[Any]:
    started: list[DevRun] = []

    def start(env: dict[str, str], *args: str) -> DevRun:
        run = DevRun(env, *args)
        started.append(run)
        return run

    yield start
    for run in started:
        run.stop()  # after a passing test there is nothing left to stop


@pytest.fixture
def client_js(tmp_path: Path) -> Path:
    path = tmp_path / "npm" / "socket.io.min.js"
    path.parent.mkdir()
    path.write_bytes(DUMMY_JS)
    return path


def pid_alive(pid: int) -> bool:
    """Tell whether a process with this PID exists (and is not a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def children(pid: int) -> list[int]:
    """Return the PIDs whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def wait_exit(proc: subprocess.Popen[bytes], timeout: float, output: str) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"devrun still running {timeout} s after the signal:\n{output}")


def demo_started(run: DevRun) -> dict[str, Any]:
    """Wait for the banner; return what it printed."""
    run.wait_for(r"^Ctrl-C stops")
    pg = re.search(r"postgres: +postgresql://\S+@127\.0\.0\.1:(\d+)/\S+ +\(folder (\S+)\)",
                   run.output)
    assert pg, run.output
    folder = Path(pg.group(2))
    postmaster = int((folder / "data" / "postmaster.pid").read_text().split()[0])
    return {
        "gunicorn": int(run.wait_for(r"gunicorn pid (\d+)").group(1)),
        "demo_url": run.wait_for(r"demo page: +(\S+)").group(1),
        "curl": run.wait_for(r"^curl .*$").group(0),
        "pg_port": int(pg.group(1)), "pg_folder": folder, "postmaster": postmaster,
    }


def assert_all_stopped(info: dict[str, Any], workers: list[int]) -> None:
    for pid in [info["gunicorn"], *workers, info["postmaster"]]:
        assert not pid_alive(pid), f"process {pid} is still running"
    assert not info["pg_folder"].exists()
    assert not port_open(info["pg_port"])


def test_make_run_serves_the_demo_and_ctrl_c_stops_everything(devrun: Any, client_js: Path,
                                                              listen: Any) -> None:
    run = devrun({}, "--client-js", str(client_js))
    info = demo_started(run)
    assert info["demo_url"] == f"{run.url}/demo#token=demo-alice-token&organizationId=acme"
    assert "demo token:  demo-alice-token" in run.output
    workers = children(info["gunicorn"])
    assert workers, "gunicorn has no worker"

    assert requests.get(run.url + "/healthz", timeout=5).json() == {"status": "ok"}
    page = requests.get(run.url + "/demo", timeout=5)
    assert page.status_code == 200
    assert page.headers["Content-Type"].startswith("text/html")
    assert "/demo/socket.io.min.js" in page.text
    js = requests.get(run.url + "/demo/socket.io.min.js", timeout=5)
    assert js.status_code == 200 and js.content == DUMMY_JS

    alice = listen(run.url, auth={"token": "demo-alice-token", "organizationId": "acme"})
    assert alice.connect_error is None
    curl = subprocess.run(["bash", "-c", info["curl"]], capture_output=True, text=True,
                          timeout=30)
    assert curl.returncode == 0, curl.stderr
    assert curl.stdout.split()[1] == "202", curl.stdout
    assert '"room":"organization.acme"' in curl.stdout.replace(" ", "")
    assert alice.wait_for("news") == {"title": "Hello from curl"}

    expired = listen(run.url, auth={"token": "demo-expired-token", "organizationId": "acme"})
    assert expired.refusal_code == "token_expired"
    alice.close()

    run.proc.send_signal(signal.SIGINT)
    assert wait_exit(run.proc, 40, run.output) == 0
    run.wait_for(r"throwaway Postgres stopped", timeout=5)
    assert_all_stopped(info, workers)


def test_gunicorn_exiting_by_itself_stops_postgres(devrun: Any, client_js: Path) -> None:
    run = devrun({}, "--client-js", str(client_js))
    info = demo_started(run)
    workers = children(info["gunicorn"])
    os.kill(info["gunicorn"], signal.SIGTERM)  # gunicorn's own graceful stop: exit code 0
    assert wait_exit(run.proc, 40, run.output) == 0
    assert "gunicorn exited by itself with 0" in run.output
    assert_all_stopped(info, workers)


def test_with_database_url_it_only_serves(devrun: Any, postgres: ThrowawayPostgres,
                                          client_js: Path) -> None:
    run = devrun({"DATABASE_URL": postgres.dsn}, "--client-js", str(client_js))
    gunicorn = int(run.wait_for(r"serving at \S+ +\(gunicorn pid (\d+)\)").group(1))
    assert "throwaway Postgres" not in run.output
    assert "curl" not in run.output
    assert requests.get(run.url + "/healthz", timeout=5).status_code == 200
    assert requests.get(run.url + "/demo", timeout=5).status_code == 404  # not asked for
    published = requests.post(run.url + "/api/v1/organizations/org-a/events",
                              json={"event": "news"}, timeout=5)
    assert published.json()["error"]["code"] == "api_disabled"  # no key made up either

    run.proc.send_signal(signal.SIGTERM)
    assert wait_exit(run.proc, 40, run.output) == 0
    assert not pid_alive(gunicorn)


def run_devrun_briefly(**env: str) -> subprocess.CompletedProcess[str]:
    """Run devrun.py to completion (for start-up failures) with a clean environment."""
    full = {k: v for k, v in os.environ.items()
            if not k.startswith(("ORGCAST_", "REDIS_", "DATABASE_"))}
    full.update(env)
    return subprocess.run([sys.executable, str(DEVRUN)], cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=30)


def test_busy_port_fails_clearly_before_starting_anything() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = run_devrun_briefly(BIND=f"127.0.0.1:{port}")
    assert out.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: it is already in use" in out.stderr
    assert "Postgres" not in out.stdout + out.stderr


def test_bad_setting_fails_with_one_line() -> None:
    out = run_devrun_briefly(BIND=f"127.0.0.1:{free_port()}", ORGCAST_DB_POOL_SIZE="lots")
    assert out.returncode == 2
    assert out.stderr.strip() == ("orgcast: configuration error: ORGCAST_DB_POOL_SIZE: "
                                  "expected a positive integer")
    assert out.stdout == ""
