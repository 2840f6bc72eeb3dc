"""What every part of the benchmark uses: processes, measurements, the two load generators.

Every process started here runs in a session of its own (its process group
is its PID) and is stopped by :func:`stop_process`, by PID and then by group,
from a ``finally`` block of whoever started it.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import shutil
import signal
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
HOST = "127.0.0.1"
API_KEY = "bench-api-key-0123456789abcdef"
LOADGEN_C_SRC = Path("/work/shared/tools/loadgen-c")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def fmt(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


# --- processes -----------------------------------------------------------------


def pinned(cmd: list[str], core: int | None) -> list[str]:
    """Prefix ``cmd`` with taskset (it execs, so the PID stays the command's)."""
    return cmd if core is None else ["taskset", "-c", str(core), *cmd]


def spawn(cmd: list[str], core: int | None, **kwargs: Any) -> subprocess.Popen[bytes]:
    """Start ``cmd`` pinned to ``core``, in a session (and process group) of its own."""
    return subprocess.Popen(pinned(cmd, core), start_new_session=True, **kwargs)


def stop_process(proc: subprocess.Popen[Any] | None, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    """Stop a process started by :func:`spawn`: by its PID, then what is left of its group."""
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
    # Children left behind (a gunicorn worker whose master died): the group
    # created by start_new_session, whose id is this PID.
    _kill_group(proc.pid, signal.SIGKILL)


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (Postgres backends call setsid: not its group)."""
    out, todo = [], [pid]
    while todo:
        cur = todo.pop()
        out.append(cur)
        todo.extend(children(cur))
    return out


def pin_tree(root: int, core: int) -> None:
    """Pin a running process tree (Postgres, Redis) to ``core``; what it forks later inherits it."""
    for pid in descendants(root):
        subprocess.run(["taskset", "-a", "-p", "-c", str(core), str(pid)], check=False, capture_output=True)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _stat_fields(stat: str) -> list[str]:
    return stat[stat.rindex(")") + 2:].split()


def cpu_seconds(pid: int) -> float:
    fields = _stat_fields(Path(f"/proc/{pid}/stat").read_text())
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(root: int) -> float:
    """CPU of a process tree so far: the live processes, plus the children their parents
    have reaped (cutime, cstime): gunicorn workers replaced by a reload still count."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in descendants(root):
        try:
            fields = _stat_fields(Path(f"/proc/{pid}/stat").read_text())
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
    return total / ticks


def all_process_cpu() -> dict[int, tuple[int, float]]:
    """{pid: (parent pid, CPU seconds)} of every process on the machine."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = _stat_fields((entry / "stat").read_text())
            except OSError:
                continue
            out[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks)
    return out


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


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


def _core_ticks() -> dict[int, tuple[int, int, int, int]]:
    """{core: (total, idle + iowait, irq + softirq, steal)} in ticks.

    Steal is time the hypervisor gave this virtual core to another machine:
    counted as busy, it lands in ``unaccounted`` (so in other work), and
    ``steal_pct`` says how much of that it was."""
    cores = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3].isdigit():
            name, *vals = line.split()
            ticks = [int(v) for v in vals[:8]]
            cores[int(name[3:])] = (sum(ticks), ticks[3] + ticks[4], ticks[5] + ticks[6], ticks[7])
    return cores


class CpuMeter:
    """Between two marks: the busy share of each core, of the server process, of
    Postgres, and of the work that is not ours (other people's test suites
    on this shared machine skew the numbers).

    Kernel threads (ksoftirqd, kworker) and interrupt time are counted apart,
    not as other work: at 100,000+ deliveries/s most of them are our own
    loopback traffic."""

    def __init__(self, pid: int | None = None, pg_root: int | None = None) -> None:
        self.pid = pid
        self.pg_root = pg_root
        self.last = self._read()

    @staticmethod
    def _read() -> tuple[float, dict[int, tuple[int, int, int, int]], dict[int, tuple[int, float]]]:
        return time.monotonic(), _core_ticks(), all_process_cpu()

    def lap(self) -> dict[str, Any]:
        """Utilization since the creation or the last lap, in percent of one core."""
        t1, c1, procs1 = now = self._read()
        t0, c0, procs0 = self.last
        self.last = now
        wall = max(t1 - t0, 1e-6)

        def used(pids: set[int]) -> float:
            # Processes that started since the last mark count from zero.
            return 100 * sum(procs1[p][1] - (procs0[p][1] if p in procs0 else 0.0)
                             for p in pids if p in procs1) / wall

        ours = tree_of(os.getpid(), procs1)
        kernel = {p for p, (ppid, _) in procs1.items() if p == 2 or ppid == 2}
        others = set(procs1) - ours - kernel
        out: dict[str, Any] = {
            "wall_s": round(wall, 3),
            "server_pct": round(used({self.pid}), 1) if self.pid else None,
            "postgres_pct": round(used(tree_of(self.pg_root, procs1)), 1) if self.pg_root else None,
        }
        task_busy = irq = steal = 0.0
        for core in sorted(c1):
            total, idle, irqs, stolen = (c1[core][k] - c0.get(core, (0, 0, 0, 0))[k] for k in range(4))
            steal += 100 * stolen / total if total > 0 else 0.0
            share = (total - idle) / total if total > 0 else 0.0
            out[f"core{core}_busy_pct"] = round(100 * share, 1)
            task_busy += 100 * (total - idle - irqs) / total if total > 0 else 0.0
            irq += 100 * irqs / total if total > 0 else 0.0
        ours_pct, others_pct, kernel_pct = used(ours), used(others), used(kernel)
        # Busy time no live process accounts for: processes that came and went between the marks.
        gone_pct = max(0.0, task_busy - ours_pct - others_pct - kernel_pct)
        out.update({"kernel_threads_pct": round(kernel_pct, 1), "irq_pct": round(irq, 1),
                    "other_processes_pct": round(others_pct, 1), "unaccounted_pct": round(gone_pct, 1),
                    "steal_pct": round(steal, 1),
                    "other_work_pct": round(others_pct + gone_pct, 1)})
        if others_pct >= 5.0:
            # who it was (the three busiest processes that are not ours)
            top = sorted(((used({p}), p) for p in others), reverse=True)[:3]
            out["other_top"] = [f"{_comm(p)}[{p}] {pct:.0f}%" for pct, p in top if pct >= 1.0]
        return out


#: a scenario during which other work took more than this (percent of a core) is flagged
DISTURBED_PCT = 25.0


def run_repeating(what: str, runs: list[dict[str, Any]], left: int, once: Callable[..., dict[str, Any]],
                  *args: Any, other: Callable[[dict[str, Any]], float] | None = None) -> int:
    """Run ``once(*args)`` into ``runs``, repeating it while other work disturbed it (up to
    ``left`` repeats in all); return the repeats left. ``other``: the percent of a core other
    work took (default: the whole run's)."""
    while True:
        r = once(*args)
        runs.append(r)
        busy = other(r) if other is not None else float((r.get("cpu") or {}).get("other_work_pct") or 0.0)
        if "error" in r or busy <= DISTURBED_PCT or left <= 0:
            return left
        steal = (r.get("cpu") or {}).get("steal_pct")
        stolen = f", of which the hypervisor's steal ~{steal:.0f}%" if steal else ""
        r["discarded"] = f"other work took ~{busy:.0f}% of a core{stolen}; repeated"
        left -= 1
        log(f"  {what}: disturbed by other work (~{busy:.0f}% of a core{stolen}), repeating it ({left} repeats left)")


def print_footer(elapsed: float, runs: list[dict[str, Any]], kept: list[dict[str, Any]], noisy: list[str],
                 failed: list[str]) -> None:
    """The last lines of every benchmark: its time, the repeated and disturbed runs, the failures."""
    print(f"took {elapsed:.0f}s; runs repeated because other work disturbed them: "
          f"{sum('discarded' in r for r in runs)}; runs still disturbed: {len(noisy)} of {len(kept)}"
          + (f" ({'; '.join(noisy)})" if noisy else ""))
    for line in failed:
        print(f"FAILED (left out of the medians): {line}")


def wait_quiet(max_wait: float, limit: float = 15.0) -> dict[str, Any]:
    """Wait (bounded) until no core is more than ``limit`` % busy."""
    start = time.monotonic()
    busy: dict[str, float | None] = {}
    while True:
        meter = CpuMeter()
        time.sleep(1.0)
        busy = {k: v for k, v in meter.lap().items() if k.endswith("_busy_pct")}
        worst = max((v or 0.0 for v in busy.values()), default=0.0)
        if worst <= limit or time.monotonic() - start >= max_wait:
            break
    if worst > limit:
        log(f"  warning: the machine is busy with other work ({busy}); numbers will be skewed")
    return {"quiet": worst <= limit, "core_busy_pct": busy, "waited_s": round(time.monotonic() - start, 1)}


def wait_idle(pid: int, max_wait: float = 20.0, interval: float = 0.25, busy_below: float = 0.05) -> float:
    """Wait until ``pid`` uses under ``busy_below`` of a core for two intervals in a row."""
    start = time.monotonic()
    quiet = 0
    last = cpu_seconds(pid)
    while time.monotonic() - start < max_wait and quiet < 2:
        time.sleep(interval)
        cur = cpu_seconds(pid)
        quiet = quiet + 1 if (cur - last) / interval < busy_below else 0
        last = cur
    return time.monotonic() - start


def http_status(port: int, path: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


#: server log lines worth reporting
PROBLEM_RE = re.compile(r"Traceback|\bERROR\b|\bCRITICAL\b|\bWARNING\b|exception|timed out|Unavailable", re.I)


def log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def log_problems(path: Path, start: int = 0, end: int | None = None, limit: int = 10) -> dict[str, Any]:
    """Lines of a server log (bytes ``start`` to ``end``) that look like trouble: how many, how many
    of each message (timestamps, pids and numbers left out), and the first ones."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read() if end is None else f.read(max(0, end - start))
    except OSError:
        return {"count": 0, "kinds": {}, "first": [], "tracebacks": []}
    lines = data.decode(errors="replace").splitlines()
    bad = [ln for ln in lines if PROBLEM_RE.search(ln)]
    # Whole tracebacks: from "Traceback" to the next line that starts with a timestamp.
    tracebacks: list[str] = []
    for i, ln in enumerate(lines):
        if ln.startswith("Traceback") and len(tracebacks) < 3:
            j = i + 1
            while j < len(lines) and not re.match(r"^\[?\d{4}-\d\d-\d\d", lines[j]):
                j += 1
            tracebacks.append("\n".join(lines[max(0, i - 1):j])[-4000:])
    kinds: dict[str, int] = {}
    for ln in bad:
        text = re.sub(r"\d+", "N", re.sub(r"^\[?\d{4}-\d\d-\d\d[^\]]*\]?\s*(\[\d+\]\s*)?", "", ln))[:200]
        kinds[text] = kinds.get(text, 0) + 1
    top = dict(sorted(kinds.items(), key=lambda kv: -kv[1])[:limit])
    return {"count": len(bad), "kinds": top, "first": [ln[:300] for ln in bad[:limit]], "tracebacks": tracebacks}


class TempDir:
    """A temporary directory outside the repository, removed by :meth:`remove`."""

    def __init__(self, prefix: str) -> None:
        self.path = Path(tempfile.mkdtemp(prefix=prefix))
        assert not self.path.is_relative_to(ROOT)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


# --- the C fan-out load generator (shared/tools/loadgen-c) -------------------------


def build_loadgen_c(tmp: Path) -> Path:
    """Copy loadgen-c (read-only in shared/) to ``tmp`` and build it there."""
    if shutil.which("gcc") is None or shutil.which("make") is None:
        raise RuntimeError("gcc and make are needed to build loadgen-c (apt-get install gcc make)")
    dest = tmp / "loadgen-c"
    shutil.copytree(LOADGEN_C_SRC, dest)
    for path in [dest, *dest.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    subprocess.run(["make", "-s", "-C", str(dest)], check=True, capture_output=True)
    return dest / "loadgen"


def run_loadgen_c(binary: Path, options: dict[str, Any], core: int | None, logfile: Path,
                  on_line: Callable[[str], None], timeout: float) -> dict[str, Any]:
    """Run ``loadgen fanout`` with ``options`` (--name value); return its JSON line.

    Its stderr (a line per step) goes to ``logfile`` and, line by line, to ``on_line``.
    """
    cmd = [str(binary), "fanout"]
    for key, value in options.items():
        cmd += [f"--{key}", str(value)]
    proc = spawn(cmd, core, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = b"", b""
    deadline = time.monotonic() + timeout
    try:
        assert proc.stdout is not None and proc.stderr is not None
        with selectors.DefaultSelector() as sel, open(logfile, "ab") as logf:
            sel.register(proc.stdout, selectors.EVENT_READ, "out")
            sel.register(proc.stderr, selectors.EVENT_READ, "err")
            open_streams = 2
            while open_streams and time.monotonic() < deadline:
                for key, _ in sel.select(min(1.0, max(0.0, deadline - time.monotonic()))):
                    chunk = os.read(key.fileobj.fileno(), 65536)  # type: ignore[union-attr]
                    if not chunk:
                        sel.unregister(key.fileobj)
                        open_streams -= 1
                    elif key.data == "out":
                        out += chunk
                    else:
                        logf.write(chunk)
                        err += chunk
                        *lines, rest = err.split(b"\n")
                        err = rest
                        for line in lines:
                            on_line(line.decode(errors="replace"))
            if open_streams:
                raise TimeoutError(f"loadgen-c did not finish in {timeout:.0f}s")
        code = proc.wait(10)
    finally:
        stop_process(proc, timeout=5)
    lines = [ln for ln in out.decode(errors="replace").splitlines() if ln.strip()]
    if not lines:
        raise RuntimeError(f"loadgen-c exited with {code} and printed nothing (see {logfile.name})")
    result = dict(json.loads(lines[-1]))
    if "error" in result or code != 0:
        raise RuntimeError(f"loadgen-c exited with {code}: {result.get('error', lines[-1][:300])}")
    return result


# --- the Node load generator (bench/loadgen.js) ---------------------------------------


class JsLoadGen:
    """bench/loadgen.js as a child: JSON config in argv, JSON lines out, commands in."""

    def __init__(self, config: dict[str, Any], core: int | None, timeout: float) -> None:
        config = {"host": HOST, "apiKey": API_KEY, **config, "deadlineMs": int(timeout * 1000)}
        node = shutil.which("node") or "node"
        self.proc = spawn([node, str(BENCH / "loadgen.js"), json.dumps(config)], core, cwd=BENCH,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.deadline = time.monotonic() + timeout + 10
        self.sel = selectors.DefaultSelector()
        assert self.proc.stdout is not None
        self.sel.register(self.proc.stdout, selectors.EVENT_READ)
        self.buf = b""

    def read(self) -> dict[str, Any]:
        """The next JSON line; raise on exit or timeout."""
        assert self.proc.stdout is not None
        while b"\n" not in self.buf:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("loadgen.js timed out")
            if not self.sel.select(min(left, 1.0)):
                continue
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"loadgen.js exited ({self.proc.wait()}): {err[-2000:]}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        msg = dict(json.loads(line))
        if msg.get("error"):
            raise RuntimeError(f"loadgen.js: {msg['error']} (phase {msg.get('phase')})")
        return msg

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def until_final(self, on_line: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        while True:
            msg = self.read()
            if msg.get("final"):
                return msg
            if on_line is not None:
                on_line(msg)

    def close(self) -> None:
        self.sel.close()
        stop_process(self.proc, timeout=5)
