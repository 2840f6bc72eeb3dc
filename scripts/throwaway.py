"""Throwaway Postgres and Redis servers, started from the installed binaries.

Used by ``make run`` (scripts/devrun.py) when DATABASE_URL is unset, and by
the test suite. Each server lives in its own temporary folder, listens on
127.0.0.1 on a free port, and is stopped (and its folder removed) by
``stop()``. Postgres refuses to run as root, so as root the server runs as
the ``postgres`` system user that Debian's package creates.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, deadline: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until something accepts on 127.0.0.1:port, or raise with the reason."""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port}")


def postgres_bindir() -> Path:
    """Find PostgreSQL's server binaries (Debian keeps them off PATH)."""
    try:
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True)
        bindir = Path(out.stdout.strip())
        if (bindir / "initdb").exists():
            return bindir
    except (OSError, subprocess.CalledProcessError):
        pass
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), reverse=True)
    if candidates:
        return candidates[0].parent
    raise RuntimeError("PostgreSQL server binaries not found: apt-get install postgresql")


class ThrowawayPostgres:
    """A Postgres server in a temporary folder: start(), dsn, stop()."""

    def __init__(self, port: int | None = None) -> None:
        self.bindir = postgres_bindir()
        self.port = port or free_port()
        self.root = Path(tempfile.mkdtemp(prefix="orgcast-pg-"))
        self.datadir = self.root / "data"
        self.user: str | None = None
        if os.geteuid() == 0:
            self.user = "postgres"
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self.dsn = f"postgresql://orgcast@127.0.0.1:{self.port}/orgcast"
        self.proc: subprocess.Popen[bytes] | None = None

    def _cmd(self, *args: str) -> list[str]:
        return (["runuser", "-u", self.user, "--"] if self.user else []) + list(args)

    def start(self, timeout: float = 30.0) -> ThrowawayPostgres:
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        subprocess.run(self._cmd(str(self.bindir / "initdb"), "-D", str(self.datadir), "-U",
                                 "orgcast", "-A", "trust", "-E", "UTF8", "--no-sync",
                                 "--locale=C"),
                       check=True, capture_output=True)
        self._spawn()
        self.wait_ready(timeout)
        subprocess.run(self._cmd(str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p",
                                 str(self.port), "-U", "orgcast", "orgcast"),
                       check=True, capture_output=True)

    def _spawn(self) -> None:
        with open(self.root / "server.log", "ab") as log:
            self.proc = subprocess.Popen(
                self._cmd(str(self.bindir / "postgres"), "-D", str(self.datadir),
                          "-p", str(self.port), "-h", "127.0.0.1", "-k", str(self.root),
                          "-c", "fsync=off", "-c", "synchronous_commit=off",
                          "-c", "full_page_writes=off", "-c", "max_connections=200"),
                stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until the server accepts connections."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                log = (self.root / "server.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"postgres exited with {self.proc.returncode}: {log}")
            ok = subprocess.run([str(self.bindir / "pg_isready"), "-h", "127.0.0.1", "-p",
                                 str(self.port), "-q"], check=False).returncode == 0
            if ok:
                return
            time.sleep(0.1)
        raise TimeoutError("postgres did not become ready")

    def psql(self, sql: str) -> str:
        """Run SQL with psql; return its output."""
        out = subprocess.run([str(self.bindir / "psql"), self.dsn, "-v", "ON_ERROR_STOP=1",
                              "-q", "-At", "-c", sql],
                             check=True, capture_output=True, text=True)
        return out.stdout

    def load(self, path: Path) -> None:
        """Run an SQL file."""
        subprocess.run([str(self.bindir / "psql"), self.dsn, "-v", "ON_ERROR_STOP=1", "-q",
                        "-f", str(path)], check=True, capture_output=True)

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): it accepts TCP but never answers."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGSTOP)
        # Each backend calls setsid(): stop the already open connections too.
        for pid in self._backends():
            _signal(pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Thaw a paused server."""
        assert self.proc is not None
        for pid in self._backends():
            _signal(pid, signal.SIGCONT)
        os.killpg(self.proc.pid, signal.SIGCONT)

    def _backends(self) -> list[int]:
        """PIDs of the postmaster's children (backends, background workers)."""
        if self.proc is None:
            return []
        parents = _parents()
        # The postmaster is proc itself, or (as root) the child of runuser.
        postmaster = next((pid for pid, ppid in parents.items() if ppid == self.proc.pid),
                          self.proc.pid) if self.user else self.proc.pid
        return [pid for pid, ppid in parents.items() if ppid == postmaster]

    def stop_server(self) -> None:
        """Stop the server, keeping its data (start it again with restart())."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            for pid in self._backends():  # paused ones could not shut down
                _signal(pid, signal.SIGCONT)
            os.killpg(self.proc.pid, signal.SIGCONT)
            # To the whole group: as root, proc is runuser, which does not
            # forward signals to the postmaster. SIGINT: fast shutdown.
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def restart(self, timeout: float = 30.0) -> None:
        """Start a server stopped by stop_server() again on the same port."""
        self._spawn()
        self.wait_ready(timeout)

    def stop(self) -> None:
        """Stop the server and remove its folder."""
        self.stop_server()
        shutil.rmtree(self.root, ignore_errors=True)


def children_of(pid: int) -> set[int]:
    """PIDs of the processes whose parent is ``pid``."""
    return {child for child, parent in _parents().items() if parent == pid}


def terminate(proc: subprocess.Popen[Any], timeout: float = 10.0,
              sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` to a child, wait up to ``timeout`` seconds, then SIGKILL it."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _parents() -> dict[int, int]:
    """Map every process on the host to its parent (Linux /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue  # it exited meanwhile
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            found[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return found


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass  # it exited meanwhile


class ThrowawayRedis:
    """A redis-server on a free port: start(), url, stop(); no persistence unless ``persistent``
    (an append-only file fsynced at every write, in ``root``, kept across a stop with ``keep``)."""

    def __init__(self, port: int | None = None, persistent: bool = False, root: Path | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found: apt-get install redis-server")
        self.binary = binary
        self.port = port or free_port()
        self.persistent = persistent
        self.root = root or Path(tempfile.mkdtemp(prefix="orgcast-redis-"))
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> ThrowawayRedis:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             *(["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else ["--appendonly", "no"]),
             "--dir", str(self.root), "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_port(self.port, time.monotonic() + timeout, self.proc)
        return self

    def stop(self, keep: bool = False) -> None:
        if self.proc is not None:
            terminate(self.proc)
        self.proc = None
        if not keep:
            shutil.rmtree(self.root, ignore_errors=True)
