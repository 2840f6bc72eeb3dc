"""What an ``Idempotency-Key`` costs a publish: requests/s with and without one (``bench/idempotency.py``).

For each bus (``--bus postgres``, ``--bus redis`` or ``--bus postgres,redis``):

- a throwaway Postgres (``scripts/throwaway.py``) with ``scripts/schema.sql``,
  and for the Redis bus a throwaway redis-server (``REDIS_URL``);
- orgcast as in production, ``gunicorn -c gunicorn.conf.py wsgi:app``, with
  ``WEB_CONCURRENCY=1``, ``ORGCAST_ACCESS_LOG=false`` and
  ``ORGCAST_LOG_LEVEL=warning``, loaded once ``GET /readyz`` answers 200;
- gunicorn (master and its one worker) pinned to core 0; wrk, Postgres and
  Redis to core 1 (``taskset``, unless ``--no-pin`` or it is missing);
- wrk, ``--threads`` 4, ``--connections`` 16, ``--duration`` 10 s:
  ``POST /api/v1/organizations/org-<i mod 50>/events`` with
  ``{"event":"news","data":{"n":1}}`` and the API key, *plain* (no key) and
  *key* (an ``Idempotency-Key`` unique to each request: ``r<run>-k<thread>-<n>``,
  the thread's number set by wrk's ``setup(thread)``), alternating the order
  over ``--rounds`` rounds (default 3). One short plain warm-up run first.

Every response is counted by status in wrk's Lua ``response()``, and so are the
202s whose body says ``"duplicate"`` (there should be none: every key is new).
Per run: requests/s, latency percentiles, the worker's CPU per request, and
Postgres's (and Redis's) CPU per request. After the runs, the gunicorn log is
searched for tracebacks and warnings.

    .venv/bin/python bench/idempotency.py --bus postgres,redis
    .venv/bin/python bench/idempotency.py --bus redis --rounds 5 --duration 20

The table goes to stdout, progress to stderr, everything to
``bench/results/<date>-idempotency.json`` (``-2``, ``-3`` … if taken). The
exit status is 1 when any response was not 2xx, any wrk error or duplicate was
counted, fewer keys were remembered than keyed publishes were answered 202, or
the gunicorn log holds a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from common import (
    API_KEY,
    HOST,
    PROBLEM_RE,
    ROOT,
    CpuMeter,
    children,
    cpu_seconds,
    fmt,
    log,
    pin_tree,
    spawn,
    stop_process,
    tree_cpu_seconds,
    wait_quiet,
)
from report import results_path, save

sys.path[:0] = [str(ROOT / "scripts")]

from throwaway import ThrowawayPostgres, ThrowawayRedis, free_port  # noqa: E402

SERVER_CORE, CLIENT_CORE = 0, 1
BODY = '{"event":"news","data":{"n":1}}'
VARIANTS = ("plain", "key")

#: wrk's script. setup() and done() run in wrk's main Lua state; init(), request() and
#: response() in each thread's own state, where ``id`` is the global setup() set.
LUA = r"""
local threads = {}
local next_id = 1

function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

local keyed = __KEYED__
local prefix = "__PREFIX__"
local orgs = __ORGS__
local body = '__BODY__'
local auth = "Bearer __API_KEY__"

function init(args)
  n = 0
  codes = {}
  duplicates = 0
end

function request()
  n = n + 1
  local headers = {["Content-Type"] = "application/json", ["Authorization"] = auth}
  if keyed then
    headers["Idempotency-Key"] = prefix .. "k" .. id .. "-" .. n
  end
  return wrk.format("POST", "/api/v1/organizations/org-" .. ((n + id) % orgs) .. "/events", headers, body)
end

function response(status, headers, body)
  codes[status] = (codes[status] or 0) + 1
  if body and string.find(body, '"duplicate"', 1, true) then
    duplicates = duplicates + 1
  end
end

function done(summary, latency, requests)
  local total, dups, sent = {}, 0, 0
  for _, t in ipairs(threads) do
    for status, count in pairs(t:get("codes")) do
      total[status] = (total[status] or 0) + count
    end
    dups = dups + t:get("duplicates")
    sent = sent + t:get("n")
  end
  local parts = {}
  for status, count in pairs(total) do
    parts[#parts + 1] = string.format('"%d": %d', status, count)
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "bytes": %d, "built": %d, "statuses": {%s}, ' ..
    '"duplicates": %d, "errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
    '"latency_us": {"mean": %.1f, "p50": %d, "p90": %d, "p99": %d, "max": %d}}\n',
    summary.requests, summary.duration, summary.bytes, sent, table.concat(parts, ", "), dups,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def lua_script(keyed: bool, prefix: str, orgs: int) -> str:
    values = {"__KEYED__": "true" if keyed else "false", "__PREFIX__": prefix, "__ORGS__": str(orgs),
              "__BODY__": BODY, "__API_KEY__": API_KEY}
    return re.sub("|".join(values), lambda m: values[m.group(0)], LUA)


def http_status(port: int, path: str, timeout: float = 2.0) -> int | None:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return None


class Gunicorn:
    """orgcast under gunicorn, one worker, its output in ``log_path``."""

    def __init__(self, tree: Path, dsn: str, redis_url: str | None, core: int | None, log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("ORGCAST_") and k not in ("REDIS_URL", "WEB_CONCURRENCY", "DATABASE_URL")}
        env.update({"DATABASE_URL": dsn, "BIND": f"{HOST}:{self.port}", "WEB_CONCURRENCY": "1",
                    "ORGCAST_API_KEYS": API_KEY, "ORGCAST_ACCESS_LOG": "false", "ORGCAST_LOG_LEVEL": "warning"})
        if redis_url:
            env["REDIS_URL"] = redis_url
        if tree != ROOT:
            env["PYTHONPATH"] = str(tree)  # ahead of the virtualenv's editable install
        self.env = env
        self.cmd = [str(ROOT / ".venv" / "bin" / "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"]
        self.tree = tree
        self.core = core
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        with open(self.log_path, "ab") as out:
            self.proc = spawn(self.cmd, self.core, cwd=self.tree, env=self.env, stdout=out,
                              stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.proc.returncode}: {self.log_tail()}")
            if http_status(self.port, "/readyz") == 200:
                return
            time.sleep(0.1)
        raise TimeoutError(f"/readyz did not answer 200 within {timeout:.0f} s: {self.log_tail()}")

    def worker(self) -> int:
        assert self.proc is not None
        kids = children(self.proc.pid)
        if len(kids) != 1:
            raise RuntimeError(f"gunicorn master {self.proc.pid} has children {kids}, not one worker")
        return kids[0]

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGINT, timeout=20)
        self.proc = None


def run_wrk(wrk: str, port: int, script: Path, args: argparse.Namespace, duration: float,
            core: int | None) -> dict[str, Any]:
    cmd = [wrk, f"-t{args.threads}", f"-c{args.connections}", f"-d{duration:g}s", "--timeout", "5s", "-s",
           str(script), f"http://{HOST}:{port}"]
    cmd = cmd if core is None else ["taskset", "-c", str(core), *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60, check=False)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stdout[-1500:]} {out.stderr[-1500:]}")
    res: dict[str, Any] = json.loads(line.split(" ", 1)[1])
    res["stdout"] = out.stdout
    non = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out.stdout)
    res["wrk_non_2xx_3xx"] = int(non.group(1)) if non else 0
    res["non_2xx"] = sum(v for k, v in res["statuses"].items() if not 200 <= int(k) < 300)
    res["requests_per_s"] = res["requests"] / (res["duration_us"] / 1e6)
    return res


def idempotency_rows(pg: ThrowawayPostgres, redis_url: str | None) -> int:
    """Keys remembered so far: log entries with a key, or Redis keys of the prefix."""
    if redis_url is None:
        return int(pg.psql("SELECT count(*) FROM orgcast.log WHERE idem IS NOT NULL").strip())
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        return sum(1 for _ in client.scan_iter(match="orgcast:idempotency:*", count=10000))
    finally:
        client.close()


def one_run(label: str, variant: str, wrk: str, server: Gunicorn, pg: ThrowawayPostgres,
            redis: ThrowawayRedis | None, args: argparse.Namespace, workdir: Path, pin: bool,
            duration: float) -> dict[str, Any]:
    script = workdir / f"{label}.lua"
    script.write_text(lua_script(variant == "key", f"{label}-", args.orgs))
    quiet = wait_quiet(args.wait_quiet)
    worker = server.worker()
    pg_pid = pg.proc.pid if pg.proc else None
    rows_before = idempotency_rows(pg, redis.url if redis else None) if variant == "key" else None
    cpu0 = (cpu_seconds(worker), tree_cpu_seconds(pg_pid) if pg_pid else 0.0,
            cpu_seconds(redis.proc.pid) if redis and redis.proc else 0.0)
    meter = CpuMeter(worker, pg_pid)
    res = run_wrk(wrk, server.port, script, args, duration, CLIENT_CORE if pin else None)
    res["cpu"] = meter.lap()
    cpu1 = (cpu_seconds(worker), tree_cpu_seconds(pg_pid) if pg_pid else 0.0,
            cpu_seconds(redis.proc.pid) if redis and redis.proc else 0.0)
    n = max(res["requests"], 1)
    res.update({
        "label": label, "variant": variant, "quiet": quiet,
        "server_cpu_us_per_request": (cpu1[0] - cpu0[0]) * 1e6 / n,
        "server_cpu_pct": (cpu1[0] - cpu0[0]) * 100 / (res["duration_us"] / 1e6),
        "postgres_cpu_us_per_request": (cpu1[1] - cpu0[1]) * 1e6 / n,
        "redis_cpu_us_per_request": (cpu1[2] - cpu0[2]) * 1e6 / n if redis else None,
    })
    if rows_before is not None:
        res["keys_remembered_added"] = idempotency_rows(pg, redis.url if redis else None) - rows_before
    log(f"  {label}: {res['requests_per_s']:,.0f} req/s, p50 {res['latency_us']['p50'] / 1000:.2f} ms, "
        f"p99 {res['latency_us']['p99'] / 1000:.2f} ms, statuses {res['statuses']}, "
        f"duplicates {res['duplicates']}, errors {res['errors']}, "
        f"server {res['server_cpu_pct']:.0f} % of a core, {res['server_cpu_us_per_request']:.0f} µs/req, "
        f"core 1 {res['cpu'].get('core1_busy_pct')} % busy, other work {res['cpu'].get('other_work_pct')} %")
    return res


def run_bus(bus: str, wrk: str, tree: Path, args: argparse.Namespace, workdir: Path, pin: bool) -> dict[str, Any]:
    log(f"bus {bus}: throwaway Postgres{' and Redis' if bus == 'redis' else ''}")
    pg = ThrowawayPostgres()
    redis: ThrowawayRedis | None = None
    server: Gunicorn | None = None
    try:
        pg.start()
        pg.load(tree / "scripts" / "schema.sql")
        if bus == "redis":
            redis = ThrowawayRedis().start()
        if pin:
            assert pg.proc is not None
            pin_tree(pg.proc.pid, CLIENT_CORE)
            if redis is not None and redis.proc is not None:
                pin_tree(redis.proc.pid, CLIENT_CORE)
        server = Gunicorn(tree, pg.dsn, redis.url if redis else None, SERVER_CORE if pin else None,
                          workdir / f"gunicorn-{bus}.log")
        server.start()
        log(f"  gunicorn on port {server.port}, worker {server.worker()}")
        runs = []
        if args.warmup > 0:
            warm = one_run(f"{bus}-warmup", "plain", wrk, server, pg, redis, args, workdir, pin, args.warmup)
            warm["warmup"] = True
            runs.append(warm)
        for r in range(1, args.rounds + 1):
            order = VARIANTS if r % 2 else tuple(reversed(VARIANTS))
            for variant in order:
                runs.append(one_run(f"{bus}-r{r}-{variant}", variant, wrk, server, pg, redis, args, workdir, pin,
                                    args.duration))
        server.stop()
        server_log = server.log_tail(10**7)
        server = None
    finally:
        if server is not None:
            server.stop()
        if redis is not None:
            redis.stop()
        pg.stop()
    measured = [r for r in runs if not r.get("warmup")]

    def med(variant: str, key: str) -> float:
        return statistics.median(r[key] for r in measured if r["variant"] == variant)

    summary: dict[str, Any] = {}
    for v in VARIANTS:
        summary[v] = {
            "requests_per_s": [round(r["requests_per_s"], 1) for r in measured if r["variant"] == v],
            "median_requests_per_s": med(v, "requests_per_s"),
            "median_p50_ms": statistics.median(r["latency_us"]["p50"] / 1000 for r in measured
                                               if r["variant"] == v),
            "median_p99_ms": statistics.median(r["latency_us"]["p99"] / 1000 for r in measured
                                               if r["variant"] == v),
            "median_server_cpu_us_per_request": med(v, "server_cpu_us_per_request"),
            "median_postgres_cpu_us_per_request": med(v, "postgres_cpu_us_per_request"),
            "median_redis_cpu_us_per_request": med(v, "redis_cpu_us_per_request") if redis else None,
            "median_core1_busy_pct": statistics.median(r["cpu"].get("core1_busy_pct") or 0.0 for r in measured
                                                       if r["variant"] == v),
            "max_other_work_pct": max(r["cpu"].get("other_work_pct") or 0.0 for r in measured if r["variant"] == v),
            "non_2xx": sum(r["non_2xx"] for r in measured if r["variant"] == v),
            "wrk_errors": sum(sum(r["errors"].values()) for r in measured if r["variant"] == v),
            "duplicates": sum(r["duplicates"] for r in measured if r["variant"] == v),
        }
    problems = [ln for ln in server_log.splitlines() if PROBLEM_RE.search(ln)]
    return {
        "bus": bus, "runs": runs, "summary": summary,
        "ratio_key_over_plain": summary["key"]["median_requests_per_s"] / summary["plain"]["median_requests_per_s"],
        "warmup_non_2xx": sum(r["non_2xx"] for r in runs if r.get("warmup")),
        "gunicorn_log_problem_lines": problems[:200],
        "gunicorn_log_tracebacks": server_log.count("Traceback"),
    }


def render(buses: list[dict[str, Any]]) -> str:
    lines = ["| bus | plain req/s | key req/s | key ÷ plain | p50 / p99 ms plain | p50 / p99 ms key "
             "| server µs/req plain / key | Postgres µs/req plain / key | Redis µs/req plain / key "
             "| core 1 busy % plain / key | non-2xx, wrk errors, duplicates |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for b in buses:
        p, k = b["summary"]["plain"], b["summary"]["key"]
        bad = ", ".join(str(p[x] + k[x]) for x in ("non_2xx", "wrk_errors", "duplicates"))
        lines.append(
            f"| {b['bus']} | {fmt(p['median_requests_per_s'], 0)} | {fmt(k['median_requests_per_s'], 0)} "
            f"| {b['ratio_key_over_plain']:.3f} | {fmt(p['median_p50_ms'], 2)} / {fmt(p['median_p99_ms'], 2)} "
            f"| {fmt(k['median_p50_ms'], 2)} / {fmt(k['median_p99_ms'], 2)} "
            f"| {fmt(p['median_server_cpu_us_per_request'], 0)} / {fmt(k['median_server_cpu_us_per_request'], 0)} "
            f"| {fmt(p['median_postgres_cpu_us_per_request'], 0)} / "
            f"{fmt(k['median_postgres_cpu_us_per_request'], 0)} "
            f"| {fmt(p['median_redis_cpu_us_per_request'], 0)} / {fmt(k['median_redis_cpu_us_per_request'], 0)} "
            f"| {fmt(p['median_core1_busy_pct'], 0)} / {fmt(k['median_core1_busy_pct'], 0)} | {bad} |")
    lines.append("")
    for b in buses:
        for v in VARIANTS:
            s = b["summary"][v]
            lines.append(f"{b['bus']} {v}: " + ", ".join(f"{x:,.0f}" for x in s["requests_per_s"]) + " req/s")
    return "\n".join(lines)


def environment(tree: Path, sha: str | None, wrk: str) -> dict[str, Any]:
    def cmd(*c: str) -> str:
        try:
            return subprocess.run(list(c), cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()
        except OSError:
            return ""

    return {
        "commit": sha or cmd("git", "rev-parse", "HEAD"),
        "exported_commit": sha,
        "uncommitted_server_files": None if sha else cmd("git", "status", "--short", "--", "app", "wsgi.py",
                                                         "gunicorn.conf.py", "scripts/schema.sql"),
        "wrk": cmd(wrk, "-v").splitlines()[0] if cmd(wrk, "-v") else None,
        "python": platform.python_version(),
        "postgres": cmd("psql", "--version"),
        "redis": cmd("redis-server", "--version"),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
    }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bus", default="postgres", help="postgres, redis, or postgres,redis (default postgres)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; each runs both variants (default 3)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run (default 10)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of a plain warm-up run, 0 for none")
    p.add_argument("--threads", type=int, default=4, help="wrk threads (default 4)")
    p.add_argument("--connections", type=int, default=16, help="wrk connections (default 16)")
    p.add_argument("--orgs", type=int, default=50, help="organizations published to, round robin (default 50)")
    p.add_argument("--wait-quiet", type=float, default=10.0, help="wait up to S s for a quiet machine per run")
    p.add_argument("--no-pin", action="store_true", help="no taskset")
    p.add_argument("--commit", help="run orgcast from that commit's files (as bench/run.py --commit)")
    p.add_argument("--output", type=Path, help="results JSON (default bench/results/<date>-idempotency[-n].json)")
    args = p.parse_args(argv)
    buses = [b.strip() for b in args.bus.split(",") if b.strip()]
    if not buses or any(b not in ("postgres", "redis") for b in buses):
        p.error("--bus: postgres, redis or postgres,redis")
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("bench: wrk not found: apt-get install -y wrk")
    pin = not args.no_pin and shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    if not pin and not args.no_pin:
        log("no taskset or one core: not pinned")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="orgcast-idem-") as tmp:
        workdir = Path(tmp)
        tree, sha = ROOT, None
        if args.commit:
            from servers import export_commit

            sha = export_commit(args.commit, workdir / "tree")
            tree = workdir / "tree"
            log(f"orgcast from {sha[:12]} ({tree})")
        results_buses = [run_bus(b, wrk, tree, args, workdir, pin) for b in buses]
    table = render(results_buses)
    results = {
        "kind": "idempotency",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join([".venv/bin/python", "bench/idempotency.py", *argv]),
        "seconds": round(time.monotonic() - started, 1),
        "settings": {"rounds": args.rounds, "duration_s": args.duration, "warmup_s": args.warmup,
                     "threads": args.threads, "connections": args.connections, "orgs": args.orgs, "pinned": pin,
                     "body": BODY, "path": "/api/v1/organizations/org-<i mod orgs>/events"},
        "environment": environment(tree, sha, wrk),
        "buses": results_buses,
        "table": table,
    }
    print(table)
    print(f"raw results: {save(results, results_path('idempotency', args.output))}")
    bad = False
    for b in results_buses:
        for v in VARIANTS:
            s = b["summary"][v]
            if s["non_2xx"] or s["wrk_errors"] or s["duplicates"]:
                log(f"{b['bus']} {v}: non-2xx {s['non_2xx']}, wrk errors {s['wrk_errors']}, "
                    f"duplicates {s['duplicates']}")
                bad = True
        short = [r["label"] for r in b["runs"] if r["variant"] == "key"
                 and r.get("keys_remembered_added", 0) < r["statuses"].get("202", 0)]
        if short:
            log(f"{b['bus']}: fewer keys remembered than keyed publishes answered 202 in {short}")
            bad = True
        if b["gunicorn_log_tracebacks"] or b["warmup_non_2xx"]:
            log(f"{b['bus']}: {b['gunicorn_log_tracebacks']} tracebacks in the gunicorn log, "
                f"{b['warmup_non_2xx']} non-2xx in the warm-up")
            bad = True
        for line in b["gunicorn_log_problem_lines"][:10]:
            log(f"  {b['bus']} gunicorn: {line}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
