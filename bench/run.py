"""Side-by-side benchmark: orgcast against node-seed, whole processes.

    .venv/bin/python bench/run.py            # the default run (make bench)
    .venv/bin/python bench/run.py --quick    # a small, fast run for debugging

One throwaway Postgres holds the tokens, users and memberships. Each round
starts a fresh server (orgcast under gunicorn, or node-seed under node),
pinned to core 0, and drives it with bench/loadgen.js (Node + ws, speaking
Engine.IO 4 / Socket.IO 5 directly) pinned to core 1, with Postgres:

1. idle RSS per authorized socket: worker RSS after connecting S sockets
   minus before, divided by S;
2. fan-out: those S sockets in ``organization.1``; events published by HTTP
   at fixed rates (a ladder of steps), every delivery timed and counted;
3. authorized connects/s: C fresh clients, 100 in flight, timed from
   opening the websocket to the Socket.IO CONNECT ack.

Rounds alternate between the servers (the order flips every round), and the
table reports medians and the ratio orgcast / node-seed. Raw results go to
bench/results/<date>.json. Traffic goes to 127.0.0.1 only; every process
started here is stopped by its id in a ``finally`` block.

One file of several hundred lines on purpose: a benchmark is read and run as
a whole, and nothing in it is imported by the service or the tests.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(ROOT / "scripts"))

from throwaway import ThrowawayPostgres, free_port  # noqa: E402

NODE_SEED_DIR = Path("/work/shared/peers/node-seed")
API_KEY = "bench-api-key-0123456789abcdef"
ORG = "1"
TOKEN_PREFIX = "bt"
WARMUP_SOCKETS = 20
HOST = "127.0.0.1"

#: fan-out ladder: target deliveries/s (events/s = target / sockets)
DEFAULT_TARGETS = (10_000, 20_000, 30_000, 40_000, 50_000, 60_000, 70_000, 80_000)
QUICK_TARGETS = (10_000, 30_000)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- processes --------------------------------------------------------------


def have_taskset() -> bool:
    return shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2


def pinned(cmd: list[str], core: int | None) -> list[str]:
    """Prefix ``cmd`` with taskset (it execs, so the PID stays the command's)."""
    if core is None:
        return cmd
    return ["taskset", "-c", str(core), *cmd]


def stop_process(proc: subprocess.Popen[Any] | None, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    """Stop a process we started (in its own session) by its PID, then its group."""
    if proc is None:
        return
    if proc.poll() is None:
        try:
            os.kill(proc.pid, sig)
            proc.wait(timeout)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            log(f"pid {proc.pid} did not stop in {timeout:.0f}s: SIGKILL")
            _kill_group(proc.pid, signal.SIGKILL)
            proc.wait(5)
    # Children left behind (a gunicorn worker whose master died): the process
    # group we created with start_new_session, whose id is this PID.
    _kill_group(proc.pid, signal.SIGKILL)


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (Postgres backends call setsid, so not its group)."""
    out, todo = [], [pid]
    while todo:
        cur = todo.pop()
        out.append(cur)
        todo.extend(children(cur))
    return out


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def all_process_cpu() -> dict[int, tuple[int, float]]:
    """{pid: (parent pid, CPU seconds)} of every process on the machine."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks)
    return out


def tree_of(root: int, procs: dict[int, tuple[int, float]]) -> set[int]:
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        kids.setdefault(ppid, []).append(pid)
    out, todo = set(), [root]
    while todo:
        cur = todo.pop()
        out.add(cur)
        todo.extend(kids.get(cur, []))
    return out


class CpuMeter:
    """Between two marks: busy share of each core, of the server, of Postgres, and of
    every process that is not ours (other work on a shared machine skews the numbers)."""

    def __init__(self, pid: int, pg_root: int | None = None) -> None:
        self.pid = pid
        self.pg_root = pg_root
        self.last = self._read()

    def _read(self) -> tuple[float, dict[int, tuple[int, int]], dict[int, tuple[int, float]]]:
        cores = {}
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("cpu") and line[3].isdigit():
                name, *vals = line.split()
                ticks = [int(v) for v in vals[:8]]
                cores[int(name[3:])] = (sum(ticks), ticks[3] + ticks[4])  # total, idle + iowait
        return time.monotonic(), cores, all_process_cpu()

    def mark(self) -> None:
        self.last = self._read()

    def lap(self) -> dict[str, float | None]:
        """Utilization since the last mark or lap, in percent of one core."""
        t1, c1, procs1 = now = self._read()
        t0, c0, procs0 = self.last
        self.last = now
        wall = max(t1 - t0, 1e-6)

        def used(pids: set[int]) -> float:
            # Processes that started since the last mark count from zero.
            return sum(procs1[p][1] - (procs0[p][1] if p in procs0 else 0.0) for p in pids if p in procs1)

        ours = tree_of(os.getpid(), procs1)
        pg = tree_of(self.pg_root, procs1) if self.pg_root else set()
        others = set(procs1) - ours
        out: dict[str, float | None] = {
            "wall_s": round(wall, 3),
            "server_process_pct": round(100 * used({self.pid}) / wall, 1),
            "postgres_pct": round(100 * used(pg) / wall, 1) if self.pg_root else None,
        }
        busy = 0.0
        for core in sorted(c1):
            total = c1[core][0] - c0.get(core, (0, 0))[0]
            idle = c1[core][1] - c0.get(core, (0, 0))[1]
            out[f"core{core}_busy_pct"] = round(100 * (total - idle) / total, 1) if total > 0 else None
            busy += (total - idle) / total if total > 0 else 0.0
        # Other work: processes that are not ours, plus busy time no live process
        # accounts for (processes that came and went between the two marks).
        ours_pct, others_pct = 100 * used(ours) / wall, 100 * used(others) / wall
        out["other_work_pct"] = round(others_pct + max(0.0, 100 * busy - ours_pct - others_pct), 1)
        return out


def round_disturbed(r: dict[str, Any]) -> bool:
    laps = [r["connect"].get("cpu")] + [st.get("cpu") for st in r["fanout"]]
    return any(lap and (lap.get("other_work_pct") or 0) > DISTURBED_PCT for lap in laps)


#: a phase during which other work took more than this (percent of a core) is flagged
DISTURBED_PCT = 25.0


def machine_busy(window: float = 1.0) -> dict[int, float]:
    """Busy percent of each core over ``window`` seconds."""
    meter = CpuMeter(os.getpid())
    time.sleep(window)
    lap = meter.lap()
    return {int(k[4:-9]): float(v) for k, v in lap.items() if k.startswith("core") and v is not None}


def wait_quiet(max_wait: float, limit: float = 15.0) -> dict[str, Any]:
    """Wait (bounded) until no core is more than ``limit`` % busy: other work skews the numbers."""
    start = time.monotonic()
    busy = machine_busy()
    while max(busy.values(), default=0.0) > limit and time.monotonic() - start < max_wait:
        busy = machine_busy()
    quiet = max(busy.values(), default=0.0) <= limit
    if not quiet:
        log(f"  warning: the machine is busy with other work (cores {busy} % busy); numbers will be skewed")
    return {"quiet": quiet, "core_busy_pct": busy, "waited_s": round(time.monotonic() - start, 1)}


def wait_idle(pid: int, max_wait: float = 20.0, interval: float = 0.25, busy_below: float = 0.05) -> float:
    """Wait until ``pid`` uses under ``busy_below`` of a core for two intervals in a row."""
    start = time.monotonic()
    quiet = 0
    last = cpu_seconds(pid)
    while time.monotonic() - start < max_wait:
        time.sleep(interval)
        cur = cpu_seconds(pid)
        quiet = quiet + 1 if (cur - last) / interval < busy_below else 0
        last = cur
        if quiet >= 2:
            break
    return time.monotonic() - start


def http_get(port: int, path: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def wait_healthy(port: int, proc: subprocess.Popen[Any], logfile: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{tail(logfile)}")
        try:
            if http_get(port, "/healthz", timeout=1.0) == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"server not healthy on port {port} in {timeout:.0f}s:\n{tail(logfile)}")


def tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


# --- the servers --------------------------------------------------------------


class Server:
    """One server process, started fresh for each round."""

    name = ""

    def __init__(self, dsn: str, workdir: Path, core: int | None) -> None:
        self.dsn = dsn
        self.workdir = workdir
        self.core = core
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.logfile = workdir / f"{self.name}.log"

    def command(self) -> tuple[list[str], Path, dict[str, str]]:
        raise NotImplementedError

    def start(self) -> None:
        self.port = free_port()
        cmd, cwd, env = self.command()
        with open(self.logfile, "ab") as logf:
            self.proc = subprocess.Popen(pinned(cmd, self.core), cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                         stdout=logf, stderr=logf, start_new_session=True)
        wait_healthy(self.port, self.proc, self.logfile)

    def measured_pid(self) -> int:
        """The process whose RSS and CPU are the server's."""
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None


class Orgcast(Server):
    name = "orgcast"
    #: the gunicorn config file (--gunicorn-config: try a variant without touching the project's)
    config = "gunicorn.conf.py"

    def command(self) -> tuple[list[str], Path, dict[str, str]]:
        env = dict(os.environ)
        for key in [k for k in env if k.startswith("ORGCAST_") or k in ("REDIS_URL", "WEB_CONCURRENCY")]:
            del env[key]
        env.update({
            "DATABASE_URL": self.dsn,
            "BIND": f"{HOST}:{self.port}",
            "ORGCAST_API_KEYS": API_KEY,
            "WEB_CONCURRENCY": "1",
            "ORGCAST_ACCESS_LOG": "false",
        })
        return [str(ROOT / ".venv" / "bin" / "gunicorn"), "-c", self.config, "wsgi:app"], ROOT, env

    def measured_pid(self) -> int:
        # The gunicorn worker (the master's only child with WEB_CONCURRENCY=1).
        assert self.proc is not None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            kids = children(self.proc.pid)
            if len(kids) == 1:
                return kids[0]
            time.sleep(0.1)
        raise RuntimeError(f"gunicorn master {self.proc.pid} has children {children(self.proc.pid)}")

    def stop(self) -> None:
        # SIGINT: gunicorn's quick shutdown (SIGTERM would wait for websockets).
        stop_process(self.proc, signal.SIGINT)
        self.proc = None


class NodeSeed(Server):
    name = "node-seed"
    seed_dir: Path = NODE_SEED_DIR

    def command(self) -> tuple[list[str], Path, dict[str, str]]:
        env = dict(os.environ)
        env.update({
            "DATABASE_URL": self.dsn,
            "BIND": f"{HOST}:{self.port}",
            "ORGCAST_API_KEYS": API_KEY,
            "NODE_ENV": "production",
        })
        env.pop("PG_POOL_SIZE", None)
        return [shutil.which("node") or "node", "server.js"], self.seed_dir, env


# --- the load generator -------------------------------------------------------


class LoadGen:
    """bench/loadgen.js as a child: JSON config in argv, JSON lines out."""

    def __init__(self, config: dict[str, Any], core: int | None, timeout: float) -> None:
        self.timeout = timeout
        config = {**config, "host": HOST, "deadlineMs": int(timeout * 1000)}
        self.proc = subprocess.Popen(
            pinned([shutil.which("node") or "node", str(BENCH / "loadgen.js"), json.dumps(config)], core),
            cwd=BENCH, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True)
        self.deadline = time.monotonic() + timeout + 10
        self.sel = selectors.DefaultSelector()
        assert self.proc.stdout is not None
        self.sel.register(self.proc.stdout, selectors.EVENT_READ)
        self.buf = b""

    def read(self) -> dict[str, Any]:
        """Next JSON line, or raise on exit/timeout."""
        assert self.proc.stdout is not None
        while b"\n" not in self.buf:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("load generator timed out")
            if not self.sel.select(left):
                continue
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"load generator exited ({self.proc.wait()}): {err[-2000:]}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return dict(json.loads(line))

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def until_final(self, on_line: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        while True:
            msg = self.read()
            if msg.get("final"):
                return msg
            if on_line:
                on_line(msg)

    def close(self) -> None:
        self.sel.close()
        stop_process(self.proc, signal.SIGTERM, timeout=5)


# --- one round ------------------------------------------------------------------


class Tokens:
    """Hands out fresh token ranges so that no check hits an auth cache."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.next = 1

    def take(self, n: int) -> int:
        start = self.next
        self.next += n
        if self.next - 1 > self.total:
            raise RuntimeError("ran out of benchmark tokens")
        return start


def run_round(server: Server, args: argparse.Namespace, tokens: Tokens, lg_core: int | None,
              pg_root: int | None = None) -> dict[str, Any]:
    result: dict[str, Any] = {"server": server.name}
    base = {"port": 0, "org": ORG, "tokenPrefix": TOKEN_PREFIX, "concurrency": args.concurrency,
            "apiKey": API_KEY, "payloadBytes": args.payload}
    t_round = time.monotonic()
    server.start()
    try:
        base["port"] = server.port
        pid = server.measured_pid()

        # Warm-up: a few sockets, a few events, so lazy imports and first-use
        # allocations are not charged to the measurements.
        warm = LoadGen({**base, "mode": "fanout", "sockets": WARMUP_SOCKETS, "tokenStart": tokens.take(WARMUP_SOCKETS),
                        "waitGo": False, "steps": [{"rate": 20, "events": 5}], "stopAfterFails": 0}, lg_core, 60)
        try:
            warm.until_final()
        finally:
            warm.close()
        wait_idle(pid)
        time.sleep(0.5)
        rss_before = rss_kib(pid)

        # 1 + 2: connect S sockets, sample RSS, then the fan-out ladder.
        steps = [{"rate": target / args.sockets, "events": max(args.min_events, round(target / args.sockets
                                                                                      * args.step_seconds))}
                 for target in args.targets]
        fan = LoadGen({**base, "mode": "fanout", "sockets": args.sockets, "tokenStart": tokens.take(args.sockets),
                       "waitGo": True, "steps": steps, "drainMs": 3000, "p99LimitMs": args.p99_limit,
                       "stopAfterFails": 0 if args.full_ladder else args.stop_after_fails},
                      lg_core, 60 + len(steps) * (args.step_seconds + 5))
        try:
            connected = fan.read()
            if connected.get("final"):
                raise RuntimeError(f"fan-out connect failed: {connected}")
            wait_idle(pid)
            time.sleep(1.0)
            rss_after = rss_kib(pid)
            ok = connected["ok"]
            result["rss"] = {"before_kib": rss_before, "after_kib": rss_after, "sockets": ok,
                             "per_socket_kib": (rss_after - rss_before) / ok if ok else None}
            log(f"  {server.name}: {ok} sockets, RSS {rss_before} -> {rss_after} KiB "
                f"({result['rss']['per_socket_kib']:.1f} KiB/socket)")
            meter = CpuMeter(pid, pg_root)
            profiler = start_profiler(args, server, pid, "fanout")
            fan.send("go")
            laps: dict[int, dict[str, float | None]] = {}

            def show(msg: dict[str, Any]) -> None:
                lap = laps[msg["step"]] = meter.lap()
                lap["loadgen_pct"] = msg["loadgen_cpu_pct"]
                lat = msg["latency_ms"]
                log(f"  {server.name}: fan-out {msg['offered_deliveries_per_s']:.0f}/s offered -> "
                    f"{msg['deliveries_per_s'] or 0:.0f}/s, p50 {fmt(lat['p50'])} p99 {fmt(lat['p99'])} ms, "
                    f"missing {msg['missing']}; cpu: server {fmt(lap['server_process_pct'], 0)}%, "
                    f"core1 {fmt(lap.get('core1_busy_pct'), 0)}%, loadgen {msg['loadgen_cpu_pct']:.0f}%"
                    f"{'' if msg['pass'] else '  (FAIL)'}{disturbed(lap)}")

            try:
                final = fan.until_final(show)
            finally:
                stop_profiler(profiler)
            if "error" in final:
                raise RuntimeError(f"fan-out: {final}")
            result["fanout_connect"] = final["connect"]
            result["fanout"] = final["steps"]
            for step in result["fanout"]:
                step["cpu"] = laps.get(step["step"])
        finally:
            fan.close()
        wait_idle(pid)

        # 3: authorized connects/s with fresh tokens.
        meter = CpuMeter(pid, pg_root)
        profiler = start_profiler(args, server, pid, "connect")
        conn = LoadGen({**base, "mode": "connect", "count": args.connects, "tokenStart": tokens.take(args.connects)},
                       lg_core, 120)
        try:
            final = conn.until_final()
            lap = meter.lap()  # while the load generator still lives: its CPU is ours
        finally:
            conn.close()
            stop_profiler(profiler)
        if "error" in final:
            raise RuntimeError(f"connect: {final}")
        final["cpu"] = lap
        lap["loadgen_pct"] = final.get("loadgen_cpu_pct")
        result["connect"] = final
        log(f"  {server.name}: {final['ok']}/{final['attempted']} connects, {final['connects_per_s']:.0f}/s, "
            f"auth p50 {fmt(final['auth_ms']['p50'])} p99 {fmt(final['auth_ms']['p99'])} ms, "
            f"errors {final['errors']}; cpu: server {fmt(lap['server_process_pct'], 0)}%, "
            f"core1 {fmt(lap.get('core1_busy_pct'), 0)}% (loadgen {fmt(final.get('loadgen_cpu_pct'), 0)}%, "
            f"postgres {fmt(lap['postgres_pct'], 0)}%){disturbed(lap)}")
        result["server_cpu_s"] = cpu_seconds(pid)
    finally:
        server.stop()
    result["round_s"] = time.monotonic() - t_round
    return result


def start_profiler(args: argparse.Namespace, server: Server, pid: int, phase: str) -> subprocess.Popen[bytes] | None:
    """py-spy on orgcast's worker during one phase, when --py-spy asks for it."""
    if not args.py_spy or server.name != "orgcast" or phase != args.py_spy_phase:
        return None
    default = Path(tempfile.gettempdir()) / f"orgcast-py-spy-{phase}-{time.strftime('%Y%m%d-%H%M%S')}.txt"
    out = Path(args.py_spy_output or default)
    out.parent.mkdir(parents=True, exist_ok=True)
    log(f"  py-spy recording the worker during the {phase} phase -> {out}")
    return subprocess.Popen([args.py_spy, "record", "--pid", str(pid), "--rate", "250", "--format", "raw",
                             "--output", str(out), *args.py_spy_args.split()],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def stop_profiler(proc: subprocess.Popen[bytes] | None) -> None:
    # SIGINT: py-spy writes its output and exits.
    stop_process(proc, signal.SIGINT, timeout=20)


def disturbed(lap: dict[str, float | None]) -> str:
    other = lap.get("other_work_pct") or 0.0
    return f"  [other work on the machine: ~{other:.0f}% of a core]" if other > DISTURBED_PCT else ""


def fmt(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


# --- aggregation --------------------------------------------------------------


def max_sustained(steps: list[dict[str, Any]]) -> float:
    """Deliveries/s of the highest ladder step below which every step passed too (0 if the first failed)."""
    best = 0.0
    for st in sorted(steps, key=lambda x: x["step"]):
        if not st["pass"]:
            break
        best = st["deliveries_per_s"]
    return best


def cpu_us_per(lap: dict[str, Any] | None, count: int) -> float | None:
    """Server CPU time of a phase divided by the work done in it, in microseconds."""
    if not lap or not count:
        return None
    return float(lap["server_process_pct"]) / 100 * float(lap["wall_s"]) / count * 1e6


def cpu_us_per_delivery(steps: list[dict[str, Any]]) -> float | None:
    laps = [(st.get("cpu"), st["received"]) for st in steps]
    cpu = sum(float(lap["server_process_pct"]) / 100 * float(lap["wall_s"]) for lap, _ in laps if lap)
    delivered = sum(n for lap, n in laps if lap)
    return cpu / delivered * 1e6 if delivered else None


def step_label(target: int) -> str:
    return f"@{target / 1000:g}k/s"


def metrics_of(r: dict[str, Any], targets: list[int]) -> dict[str, float | None]:
    steps = r["fanout"]
    m: dict[str, float | None] = {
        "connects/s": r["connect"]["connects_per_s"],
        "auth p50 ms": r["connect"]["auth_ms"]["p50"],
        "auth p99 ms": r["connect"]["auth_ms"]["p99"],
        "CONNECT→ack p50 ms": r["connect"]["ack_after_connect_packet_ms"]["p50"],
        "CONNECT→ack p99 ms": r["connect"]["ack_after_connect_packet_ms"]["p99"],
        "connect errors": float(sum(r["connect"]["errors"].values())),
        MAX_SUSTAINED: max_sustained(steps),
        "fan-out peak deliveries/s (any latency)": max((s["deliveries_per_s"] or 0.0) for s in steps),
        "fan-out deliveries lost": float(sum(s["missing"] + s["duplicates"] for s in steps)),
        "idle RSS KiB/socket": r["rss"]["per_socket_kib"],
        "server CPU µs per connect": cpu_us_per(r["connect"].get("cpu"), r["connect"]["ok"]),
        "server CPU µs per delivery": cpu_us_per_delivery(steps),
    }
    by_step = {s["step"]: s for s in steps}
    for j, target in enumerate(targets):
        s = by_step.get(j)
        m[f"fan-out {step_label(target)} p50 ms"] = s["latency_ms"]["p50"] if s else None
        m[f"fan-out {step_label(target)} p99 ms"] = s["latency_ms"]["p99"] if s else None
    return m


MAX_SUSTAINED = "fan-out max sustained deliveries/s"

#: rows of the printed table, with the direction that is better
ROWS_HEAD = [
    ("connects/s", "higher"),
    ("auth p50 ms", "lower"),
    ("auth p99 ms", "lower"),
    ("CONNECT→ack p50 ms", "lower"),
    ("CONNECT→ack p99 ms", "lower"),
    ("connect errors", "lower"),
    ("idle RSS KiB/socket", "lower"),
    ("server CPU µs per connect", "lower"),
    ("server CPU µs per delivery", "lower"),
    (MAX_SUSTAINED, "higher"),
    ("fan-out peak deliveries/s (any latency)", "higher"),
    ("fan-out deliveries lost", "lower"),
]


def table_rows(targets: list[int]) -> list[tuple[str, str]]:
    rows = list(ROWS_HEAD)
    for target in targets:
        rows += [(f"fan-out {step_label(target)} p50 ms", "lower"), (f"fan-out {step_label(target)} p99 ms", "lower")]
    return rows


def median_or_none(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def aggregate(rounds: list[dict[str, Any]], targets: list[int]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    names = ["orgcast", "node-seed"]
    per = {n: [metrics_of(r, targets) for r in rounds if r["server"] == n and "error" not in r
               and "discarded" not in r] for n in names}
    for metric, better in table_rows(targets):
        entry: dict[str, Any] = {"better": better}
        for n in names:
            values = [m[metric] for m in per[n]]
            entry[n] = {"median": median_or_none(values), "values": values,
                        "rounds_with_value": sum(v is not None for v in values)}
        a, b = entry["orgcast"]["median"], entry["node-seed"]["median"]
        entry["ratio"] = (a / b) if (a is not None and b) else None
        if metric == MAX_SUSTAINED and targets:
            # Every step passed: the ladder, not the server, set the limit.
            for n in names:
                med = entry[n]["median"]
                entry[n]["at_ladder_top"] = med is not None and med >= 0.97 * max(targets)
        out[metric] = entry
    return out


def render_table(agg: dict[str, dict[str, Any]], rounds: int) -> str:
    lines = ["| metric | orgcast (median) | node-seed (median) | ratio orgcast/node |",
             "|---|---:|---:|---:|"]
    for metric, e in agg.items():
        arrow = "↑" if e["better"] == "higher" else "↓"

        def cell(name: str, e: dict[str, Any] = e) -> str:
            med = e[name]["median"]
            if med is None:
                return "—"
            digits = 0 if abs(med) >= 100 else 1
            text = ("≥ " if e[name].get("at_ladder_top") else "") + f"{med:,.{digits}f}"
            if e[name]["rounds_with_value"] < rounds:
                text += f" ({e[name]['rounds_with_value']}/{rounds})"
            return text

        ratio = "—" if e["ratio"] is None else f"{e['ratio']:.2f}×"
        lines.append(f"| {metric} {arrow} | {cell('orgcast')} | {cell('node-seed')} | {ratio} |")
    return "\n".join(lines)


# --- set-up -------------------------------------------------------------------


def ensure_loadgen() -> None:
    if not (BENCH / "node_modules" / "ws").is_dir():
        log("npm ci in bench/")
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--silent"], cwd=BENCH, check=True)


def prepare_node_seed(tmp: Path, src: Path) -> Path:
    """node-seed with its node_modules: in place if present, else a temp copy."""
    if (src / "node_modules" / "socket.io").is_dir():
        return src
    dest = tmp / "node-seed"
    dest.mkdir()
    for name in ("server.js", "package.json", "package-lock.json"):
        shutil.copy(src / name, dest / name)
        (dest / name).chmod(0o644)
    log(f"npm ci for node-seed in {dest}")
    subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--silent", "--omit=dev"], cwd=dest, check=True)
    return dest


def fill_database(pg: ThrowawayPostgres, users: int, tokens: int, orgs: int) -> None:
    pg.load(ROOT / "scripts" / "schema.sql")
    pg.psql(f"""
        INSERT INTO oauth_access_tokens (access_token, client_id, user_id, expires, scope)
          SELECT '{TOKEN_PREFIX}' || i, 'bench', 'u' || (((i - 1) % {users}) + 1),
                 NOW() + INTERVAL '1 day', 'basic'
          FROM generate_series(1, {tokens}) AS i;
        INSERT INTO organization_users (organization_id, user_id)
          SELECT '{ORG}', 'u' || u FROM generate_series(1, {users}) AS u;
        INSERT INTO organization_users (organization_id, user_id)
          SELECT (2 + u % {orgs})::text, 'u' || u FROM generate_series(1, {users}) AS u;
        ANALYZE;
    """)


def pin_tree(root: int, core: int) -> None:
    for pid in descendants(root):
        subprocess.run(["taskset", "-a", "-p", "-c", str(core), str(pid)], check=False, capture_output=True)


def versions(node_seed: Path) -> dict[str, Any]:
    def cmd(*c: str, cwd: Path = ROOT) -> str:
        try:
            return subprocess.run(list(c), cwd=cwd, capture_output=True, text=True, check=False).stdout.strip()
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
                "psycopg2-binary"):
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
    return {
        "orgcast_commit": cmd("git", "rev-parse", "HEAD"),
        "orgcast_dirty": bool(cmd("git", "status", "--porcelain", "--", "app", "wsgi.py", "gunicorn.conf.py")),
        "python": platform.python_version(),
        "python_packages": py,
        "node": cmd("node", "--version"),
        "node_seed_packages": {p: npm_version(node_seed, p) for p in ("socket.io", "engine.io", "ws", "pg")},
        "loadgen_ws": npm_version(BENCH, "ws"),
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "kernel": platform.release(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--sockets", type=int, default=None, help="sockets in the fan-out room (default 2000; quick 500)")
    p.add_argument("--connects", type=int, default=None, help="clients per connect test (default 2000; quick 500)")
    p.add_argument("--rounds", type=int, default=None, help="rounds per server (default 3; quick 1)")
    p.add_argument("--quick", action="store_true", help="small sizes, one round, two ladder steps")
    p.add_argument("--targets", type=str, default=None,
                   help="fan-out ladder, comma-separated target deliveries/s "
                        f"(default {','.join(map(str, DEFAULT_TARGETS))})")
    p.add_argument("--step-seconds", type=float, default=None, help="publishing time per ladder step (default 3)")
    p.add_argument("--min-events", type=int, default=10, help="fewest events in a ladder step")
    p.add_argument("--stop-after-fails", type=int, default=2,
                   help="end a server's ladder after this many failed steps in a row (default 2)")
    p.add_argument("--full-ladder", action="store_true", help="run every ladder step, whatever fails")
    p.add_argument("--p99-limit", type=float, default=200.0, help="a step passes with p99 at or under this (ms)")
    p.add_argument("--payload", type=int, default=100, help="padding bytes in each event's data")
    p.add_argument("--concurrency", type=int, default=100, help="connects in flight")
    p.add_argument("--only", choices=("orgcast", "node-seed"), help="run one server only (no ratios)")
    p.add_argument("--wait-quiet", type=float, default=10.0,
                   help="before each round, wait up to this many seconds for other work on the machine to stop")
    p.add_argument("--py-spy", metavar="PATH", help="py-spy binary: profile orgcast's worker during one phase "
                   "(skews that phase's numbers; use with --only orgcast; turns --retries off)")
    p.add_argument("--py-spy-phase", choices=("fanout", "connect"), default="fanout")
    p.add_argument("--py-spy-args", default="--nonblocking",
                   help="extra py-spy record arguments (default --nonblocking; e.g. '--native' to see the GC)")
    p.add_argument("--py-spy-output", type=Path, help="where py-spy writes (default /tmp/orgcast-py-spy-<phase>-*.txt)")
    p.add_argument("--retries", type=int, default=2,
                   help="repeat a round disturbed by other work on the machine, at most this many times in all")
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    p.add_argument("--node-seed-dir", type=Path, default=NODE_SEED_DIR)
    p.add_argument("--gunicorn-config", default="gunicorn.conf.py",
                   help="gunicorn config file for orgcast (default the project's gunicorn.conf.py)")
    p.add_argument("--output", type=Path, default=None, help="results JSON (default bench/results/<date>.json)")
    args = p.parse_args(argv)
    quick = args.quick
    args.sockets = args.sockets or (500 if quick else 2000)
    args.connects = args.connects or (500 if quick else 2000)
    args.rounds = args.rounds or (1 if quick else 3)
    args.step_seconds = args.step_seconds or (2.0 if quick else 3.0)
    args.targets = ([int(float(x)) for x in args.targets.split(",") if x.strip()] if args.targets
                    else list(QUICK_TARGETS if quick else DEFAULT_TARGETS))
    if args.py_spy:
        args.retries = 0  # py-spy's own CPU reads as other work
    for name in ("sockets", "connects", "rounds", "concurrency"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.sockets > 8000 or args.connects > 8000:
        p.error("--sockets/--connects above 8000 would exceed this machine's file descriptor budget")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the finally blocks stop every process started here.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} not found (make system-deps installs it)", file=sys.stderr)
            return 2
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    pin = have_taskset() and not args.no_pin
    server_core, lg_core = (0, 1) if pin else (None, None)
    servers_wanted = [args.only] if args.only else ["orgcast", "node-seed"]
    per_round = WARMUP_SOCKETS + args.sockets + args.connects
    n_tokens = per_round * (args.rounds * len(servers_wanted) + args.retries)
    users = max(2000, args.sockets, args.connects, WARMUP_SOCKETS)
    started = dt.datetime.now(dt.UTC)
    t0 = time.monotonic()

    ensure_loadgen()
    tmp = Path(tempfile.mkdtemp(prefix="orgcast-bench-"))
    pg: ThrowawayPostgres | None = None
    rounds: list[dict[str, Any]] = []
    try:
        seed_dir = prepare_node_seed(tmp, args.node_seed_dir) if "node-seed" in servers_wanted else args.node_seed_dir
        environment = versions(seed_dir)
        pg = ThrowawayPostgres()
        pg.start()
        assert pg.proc is not None
        if pin:
            pin_tree(pg.proc.pid, 1)
        log(f"postgres on port {pg.port}; loading {users} users, {n_tokens} tokens")
        fill_database(pg, users, n_tokens, orgs=50)

        tokens = Tokens(n_tokens)
        NodeSeed.seed_dir = seed_dir
        Orgcast.config = str(Path(args.gunicorn_config).resolve())
        makers: dict[str, Callable[[], Server]] = {
            "orgcast": lambda: Orgcast(pg.dsn, tmp, server_core),  # type: ignore[union-attr]
            "node-seed": lambda: NodeSeed(pg.dsn, tmp, server_core),  # type: ignore[union-attr]
        }
        retries_left = args.retries
        for i in range(args.rounds):
            order = servers_wanted if i % 2 == 0 else list(reversed(servers_wanted))
            for name in order:
                while True:
                    log(f"round {i + 1}/{args.rounds}: {name}")
                    background = wait_quiet(args.wait_quiet)
                    try:
                        r = run_round(makers[name](), args, tokens, lg_core, pg.proc.pid)
                    except (RuntimeError, TimeoutError, OSError, KeyError) as exc:
                        # Recorded and left out of the medians; the other rounds go on.
                        log(f"  {name}: round failed: {exc}")
                        r = {"server": name, "error": str(exc)}
                    r["round"] = i + 1
                    r["background_before"] = background
                    rounds.append(r)
                    if "error" in r or not round_disturbed(r) or retries_left <= 0:
                        break
                    # Other work on this shared machine skewed the round: run it again (bounded).
                    r["discarded"] = "disturbed by other work on the machine; repeated"
                    retries_left -= 1
                    log(f"  {name}: round disturbed by other work, repeating it ({retries_left} repeats left)")
    finally:
        if pg is not None:
            pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    agg = aggregate(rounds, args.targets)
    table = render_table(agg, args.rounds)
    elapsed = time.monotonic() - t0
    cmdline = " ".join(["bench/run.py", *(argv if argv is not None else sys.argv[1:])])
    print()
    print(f"orgcast vs node-seed — {args.rounds} round(s) each, {args.sockets} sockets in one room, "
          f"{args.connects} connects, medians; ratio = orgcast / node-seed (↑ higher is better, ↓ lower is better)")
    print()
    print(table)
    print()
    phases = [(r["server"], r.get("round"), name, lap) for r in rounds if "error" not in r and "discarded" not in r
              for name, lap in [("connect", r["connect"].get("cpu"))]
              + [(f"fan-out step {st['step']}", st.get("cpu")) for st in r["fanout"]]]
    noisy = [f"{srv} round {rnd} {name} (~{lap['other_work_pct']:.0f}%)" for srv, rnd, name, lap in phases
             if lap and (lap.get("other_work_pct") or 0) > DISTURBED_PCT]
    failed = [f"{r['server']} round {r.get('round')}: {r['error']}" for r in rounds if "error" in r]
    repeated = sum("discarded" in r for r in rounds)
    print(f"took {elapsed:.0f}s; rounds repeated because other work disturbed them: {repeated}; "
          f"phases still disturbed by other work on the machine: {len(noisy)} of {len(phases)}"
          + (f" ({'; '.join(noisy)})" if noisy else ""))
    for line in failed:
        print(f"FAILED ROUND (left out of the medians): {line}")

    results = {
        "started_utc": started.isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed, 1),
        "command": cmdline,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "pinning": {"servers": server_core, "loadgen_and_postgres": lg_core},
        "environment": environment,
        "medians": agg,
        "table_markdown": table,
        "disturbed_phases": noisy,
        "failed_rounds": failed,
        "rounds": rounds,
    }
    output = args.output
    if output is None:
        stem = started.strftime("%Y-%m-%d") + ("-quick" if args.quick else "")
        output = BENCH / "results" / f"{stem}.json"
        n = 2
        while output.exists():
            output = BENCH / "results" / f"{stem}-{n}.json"
            n += 1
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    print(f"raw results: {output.relative_to(ROOT) if output.is_relative_to(ROOT) else output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
