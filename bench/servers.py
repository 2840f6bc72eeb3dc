"""The servers under test (orgcast under gunicorn, node-seed under node) and their database."""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import API_KEY, BENCH, HOST, ROOT, children, http_status, log, spawn, stop_process, tail

sys.path.insert(0, str(ROOT / "scripts"))

from throwaway import ThrowawayPostgres, free_port  # noqa: E402

NODE_SEED_SRC = Path("/work/shared/peers/node-seed")
#: the 15,000-socket scenarios need more than gunicorn's default of 10,000
WORKER_CONNECTIONS = 16000
#: every client of the benchmark comes from 127.0.0.1, 100 handshakes in flight: above
#: orgcast's per-address limit of sessions not yet admitted (50), meant for real clients
MAX_PENDING_PER_ADDRESS = 1000


class Server:
    """One server process, started fresh for each scenario of each round."""

    name = ""
    ready_path = "/healthz"

    def __init__(self, dsn: str, workdir: Path, core: int | None, label: str = "") -> None:
        self.dsn = dsn
        self.core = core
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.label = label or self.name
        self.logfile = workdir / f"{self.label}.log"
        self.stop_seconds: float | None = None

    def command(self) -> tuple[list[str], Path, dict[str, str]]:
        raise NotImplementedError

    def start(self, timeout: float = 30.0) -> None:
        self.port = free_port()
        cmd, cwd, env = self.command()
        with open(self.logfile, "ab") as logf:
            self.proc = spawn(cmd, self.core, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited with {self.proc.returncode}:\n{tail(self.logfile)}")
            try:
                if http_status(self.port, self.ready_path, timeout=1.0) == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.label} not ready on port {self.port} in {timeout:.0f}s:\n{tail(self.logfile)}")

    def measured_pid(self) -> int:
        """The process whose RSS and CPU are the server's."""
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        t = time.monotonic()
        stop_process(self.proc)
        self.proc = None
        self.stop_seconds = round(time.monotonic() - t, 1)


class Orgcast(Server):
    """``gunicorn -c gunicorn.conf.py wsgi:app`` from the repository, as in production, one worker."""

    name = "orgcast"
    #: where the server's code is: the repository, or an export of one commit (--commit; see export_commit)
    tree: Path = ROOT
    #: the commit exported there, if any
    exported_commit: str | None = None
    #: 200 only once the bus listener is up: a publish before that answers 503
    ready_path = "/readyz"

    def __init__(self, dsn: str, workdir: Path, core: int | None, label: str = "",
                 redis_url: str | None = None, env: dict[str, str] | None = None, workers: int = 1) -> None:
        super().__init__(dsn, workdir, core, label)
        self.redis_url = redis_url
        #: more settings (ORGCAST_RECOVERY, ORGCAST_AUTH_CACHE_TTL, ...), over the ones below
        self.extra_env = dict(env or {})
        self.workers = workers

    def command(self) -> tuple[list[str], Path, dict[str, str]]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("ORGCAST_") and k not in ("REDIS_URL", "WEB_CONCURRENCY", "DATABASE_URL")}
        env.update({
            "DATABASE_URL": self.dsn,
            "BIND": f"{HOST}:{self.port}",
            "ORGCAST_API_KEYS": API_KEY,
            "WEB_CONCURRENCY": str(self.workers),
            "ORGCAST_WORKER_CONNECTIONS": str(WORKER_CONNECTIONS),
            "ORGCAST_MAX_PENDING_PER_ADDRESS": str(MAX_PENDING_PER_ADDRESS),
        })
        if self.redis_url:
            env["REDIS_URL"] = self.redis_url
        env.update(self.extra_env)
        if self.tree != ROOT:
            # Ahead of the virtualenv's editable install (a meta-path finder that maps `app` to the
            # repository): the master, which imports app.config in gunicorn.conf.py, and the workers
            # it forks load the exported tree.
            env["PYTHONPATH"] = str(self.tree)
        return [str(ROOT / ".venv" / "bin" / "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"], self.tree, env

    def measured_pid(self) -> int:
        # The gunicorn worker (the master's only child with WEB_CONCURRENCY=1).
        return self.worker_pids(1)[0]

    def worker_pids(self, n: int | None = None, timeout: float = 10.0) -> list[int]:
        """The gunicorn workers, once there are ``n`` (default: WEB_CONCURRENCY) of them."""
        assert self.proc is not None
        n = self.workers if n is None else n
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            kids = children(self.proc.pid)
            if len(kids) == n:
                return kids
            time.sleep(0.1)
        raise RuntimeError(f"gunicorn master {self.proc.pid} has children {children(self.proc.pid)}, not {n}")

    def stop(self) -> None:
        # SIGINT: gunicorn's quick shutdown (SIGTERM would wait for the websockets). After
        # thousands of sockets the worker can take the master's graceful_timeout (10 s) to go.
        t = time.monotonic()
        stop_process(self.proc, signal.SIGINT, timeout=20)
        self.proc = None
        self.stop_seconds = round(time.monotonic() - t, 1)


class NodeSeed(Server):
    name = "node-seed"
    #: set by prepare_node_seed: a copy with its node_modules
    seed_dir: Path = NODE_SEED_SRC

    def command(self) -> tuple[list[str], Path, dict[str, str]]:
        env = {k: v for k, v in os.environ.items() if k != "PG_POOL_SIZE"}
        env.update({"DATABASE_URL": self.dsn, "BIND": f"{HOST}:{self.port}", "ORGCAST_API_KEYS": API_KEY,
                    "NODE_ENV": "production"})
        return [shutil.which("node") or "node", "server.js"], self.seed_dir, env


def prepare_node_seed(tmp: Path) -> Path:
    """A copy of node-seed (read-only in shared/) in ``tmp``, with ``npm ci`` run there."""
    dest = tmp / "node-seed"
    dest.mkdir()
    for name in ("server.js", "package.json", "package-lock.json"):
        shutil.copy(NODE_SEED_SRC / name, dest / name)
        (dest / name).chmod(0o644)
    log(f"npm ci for node-seed in {dest}")
    subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--silent", "--omit=dev"], cwd=dest, check=True)
    NodeSeed.seed_dir = dest
    return dest


class StatsPostgres(ThrowawayPostgres):
    """A throwaway Postgres that counts every statement: pg_stat_statements, loaded at start."""

    def _spawn(self) -> None:
        conf = self.datadir / "postgresql.conf"
        text = conf.read_text()
        if "orgcast bench" not in text:
            # Appended after initdb, before the first start (the file keeps its owner).
            with open(conf, "a") as f:
                f.write("\n# orgcast bench: count statements\n"
                        "shared_preload_libraries = 'pg_stat_statements'\n"
                        "pg_stat_statements.track = top\n"
                        "pg_stat_statements.track_utility = on\n"
                        "pg_stat_statements.max = 1000\n")
        super()._spawn()

    @staticmethod
    def available() -> bool:
        try:
            sharedir = subprocess.run(["pg_config", "--sharedir"], capture_output=True, text=True,
                                      check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return False
        return (Path(sharedir) / "extension" / "pg_stat_statements.control").exists()

    def enable_statements(self) -> None:
        self.psql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")

    def reset_statements(self) -> None:
        self.psql("SELECT pg_stat_statements_reset()")

    def statements(self) -> list[dict[str, Any]]:
        """What this database executed since the last reset: normalized text, calls, rows, time."""
        out = self.psql(
            "SELECT coalesce(json_agg(json_build_object('query', query, 'calls', calls, 'rows', rows, "
            "'total_ms', round(total_exec_time::numeric, 3)) ORDER BY calls DESC), '[]') "
            "FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND query NOT ILIKE '%pg_stat_statements%'")
        return list(json.loads(out.strip() or "[]"))


def fill_database(pg: ThrowawayPostgres, users: int, org_counts: list[int]) -> None:
    """The rows loadgen-c and loadgen.js expect: user ``u<n>`` (1..users) has the token
    ``tok`` + n zero-padded to 37 digits, and for every R in ``org_counts`` is a member
    of organization ((n - 1) % R) + 1."""
    pg.load(Orgcast.tree / "scripts" / "schema.sql")
    counts = ",".join(str(int(r)) for r in sorted(set(org_counts)))
    pg.psql(f"""
        INSERT INTO oauth_access_tokens (access_token, client_id, user_id, expires, scope)
          SELECT 'tok' || lpad(n::text, 37, '0'), 'bench', 'u' || n, NOW() + INTERVAL '1 day', 'basic'
          FROM generate_series(1, {int(users)}) AS n;
        INSERT INTO organization_users (organization_id, user_id)
          SELECT DISTINCT (((n - 1) % r) + 1)::text, 'u' || n
          FROM generate_series(1, {int(users)}) AS n, unnest(ARRAY[{counts}]) AS r
          ON CONFLICT DO NOTHING;
        ANALYZE;
    """)


#: what orgcast needs at run time (and the database schema the bench loads)
EXPORTED = ("app", "wsgi.py", "gunicorn.conf.py", "scripts/schema.sql")


def export_commit(rev: str, dest: Path) -> str:
    """Write ``rev``'s server files to ``dest`` (``git archive``: it reads the repository and
    changes nothing in it) and run orgcast from there: the measurements are of that commit, whatever
    is being edited in the working tree meanwhile. Returns the commit's full hash."""
    sha = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], cwd=ROOT,
                         capture_output=True, text=True, check=False).stdout.strip()
    if not sha:
        raise SystemExit(f"bench: --commit {rev}: not a commit of {ROOT}")
    tar = subprocess.run(["git", "archive", "--format=tar", sha, *EXPORTED], cwd=ROOT, capture_output=True,
                         check=True).stdout
    dest.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=tar, check=True)
    Orgcast.tree, Orgcast.exported_commit = dest, sha
    return sha


def versions(node_seed: Path | None) -> dict[str, Any]:
    def cmd(*c: str) -> str:
        try:
            return subprocess.run(list(c), cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()
        except OSError:
            return ""

    def npm_version(base: Path, pkg: str) -> str | None:
        try:
            return str(json.loads((base / "node_modules" / pkg / "package.json").read_text())["version"])
        except (OSError, ValueError, KeyError):
            return None

    from importlib import metadata

    py = {}
    for pkg in ("python-socketio", "python-engineio", "gevent", "gevent-websocket", "gunicorn", "Flask",
                "psycopg2-binary", "redis"):
        try:
            py[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            py[pkg] = None
    cpu = ""
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    exported = Orgcast.tree != ROOT
    return {
        "orgcast_commit": cmd("git", "rev-parse", "HEAD"),
        # uncommitted changes to the server's code, if any: the figures are of the working tree
        # (unless the server ran from an export of one commit: --commit)
        "orgcast_uncommitted": [] if exported else cmd(
            "git", "status", "--porcelain", "--", "app", "wsgi.py", "gunicorn.conf.py", "setup.cfg").splitlines(),
        "orgcast_tree": str(Orgcast.tree),
        "orgcast_exported_commit": Orgcast.exported_commit if exported else None,
        "python": platform.python_version(),
        "python_packages": py,
        "node": cmd("node", "--version"),
        "node_seed_packages": ({p: npm_version(node_seed, p) for p in ("socket.io", "engine.io", "ws", "pg")}
                               if node_seed else None),
        "postgres": cmd("pg_config", "--version"),
        "redis": cmd("redis-server", "--version"),
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "kernel": platform.release(),
        "bench_dir": str(BENCH),
    }
