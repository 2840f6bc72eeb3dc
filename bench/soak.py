"""Chaos soak: does every event answered 202 reach its sockets exactly once, in order, while faults happen?

Two gunicorn instances of two workers each behind README's nginx (round robin), the Postgres or the Redis
bus, N real socket.io-client sockets (bench/soak.js) in 20 organizations, a publisher at R events/s, and a
fault every S seconds, in turn. Then, per socket, the events of its organization that were answered 202 are
checked off against what it received. bench/README.md ("The chaos soak") says what each figure means.

    .venv/bin/python bench/soak.py [--bus postgres|redis] [--minutes M] [--sockets N] [--rate R] [--fault-every S]
"""

from __future__ import annotations

import argparse
import bisect
import datetime as dt
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import requests
from common import API_KEY, ROOT, log, log_problems
from report import results_path, save

sys.path[:0] = [str(ROOT / "scripts"), str(ROOT / "tests")]

from test_nginx import NGINX, nginx_conf  # noqa: E402
from throwaway import ThrowawayPostgres, ThrowawayRedis, children_of, free_port, terminate, wait_port  # noqa: E402

ORGS, USERS = 20, 60
GUNICORN = str(ROOT / ".venv" / "bin" / "gunicorn")
NODE_MODULES = ROOT / ".cache" / "npm" / "node_modules"
FAULTS = ("kill-worker", "hup-master", "restart-instance", "redis-restart", "pg-pause", "pg-terminate-listen",
          "nginx-reload")


# --- the deployment -------------------------------------------------------------------------------------------


def fill_database(pg: ThrowawayPostgres) -> None:
    """Organizations soak-0…19; users su0…59, user i in soak-(i mod 20), token soak-tok-i."""
    pg.load(ROOT / "scripts" / "schema.sql")
    pg.psql(f"INSERT INTO organization_users (organization_id, user_id) "
            f"SELECT 'soak-' || (i % {ORGS}), 'su' || i FROM generate_series(0, {USERS - 1}) i")
    pg.psql(f"INSERT INTO oauth_access_tokens (access_token, client_id, user_id, expires, scope) "
            f"SELECT 'soak-tok-' || i, 'soak', 'su' || i, now() + interval '1 day', NULL "
            f"FROM generate_series(0, {USERS - 1}) i")


class Instance:
    """One ``gunicorn -c gunicorn.conf.py wsgi:app`` (2 workers), restartable on the same port."""

    def __init__(self, name: str, env: dict[str, str], tmp: Path) -> None:
        self.name, self.port, self.tmp = name, free_port(), tmp
        self.env = {**env, "BIND": f"127.0.0.1:{self.port}"}
        self.log_path = tmp / f"gunicorn-{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        with open(self.log_path, "ab") as out:
            out.write(f"--- soak: starting {self.name} at {time.time():.3f}\n".encode())
            out.flush()
            self.proc = subprocess.Popen([GUNICORN, "-c", "gunicorn.conf.py", "wsgi:app"], cwd=ROOT, env=self.env,
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        wait_port(self.port, deadline, self.proc)
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if requests.get(f"http://127.0.0.1:{self.port}/readyz", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready:\n{self.log_path.read_text(errors='replace')[-3000:]}")

    def load(self) -> dict[int, int]:
        """Open connections (nginx's websockets, mostly) of each worker."""
        inodes = established(self.port)
        return {pid: sum(1 for i in socket_inodes(pid) if i in inodes)
                for pid in sorted(children_of(self.proc.pid) if self.proc else [])}

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc, 20)


def established(port: int) -> set[str]:
    """Socket inodes of the established TCP connections whose local port is ``port`` (/proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
            found.add(fields[9])
    return found


def socket_inodes(pid: int) -> list[str]:
    out = []
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                out.append(target[8:-1])
    except OSError:
        pass  # it exited meanwhile
    return out


def start_nginx(tmp: Path, upstream_ports: list[int]) -> tuple[subprocess.Popen[bytes], int]:
    """README's nginx block (tests/test_nginx.py's nginx_conf), with room for every socket twice."""
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = nginx_conf(tmp, port, upstream_ports)
    assert "worker_connections 256;" in conf
    (tmp / "nginx.conf").write_text(conf.replace("worker_connections 256;", "worker_connections 8192;"))
    with open(tmp / "stderr.log", "wb") as err:
        proc = subprocess.Popen([NGINX, "-c", str(tmp / "nginx.conf"), "-p", f"{tmp}/"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    wait_port(port, time.monotonic() + 10, proc)
    return proc, port


# --- the sockets (bench/soak.js) and the publisher -------------------------------------------------------------


class Sockets:
    """The Node process holding the sockets; its JSON lines, read by a thread."""

    def __init__(self, url: str, entries: list[dict[str, Any]], tmp: Path) -> None:
        node = shutil.which("node")
        assert node, "node is required (Debian package nodejs)"
        assert (NODE_MODULES / "socket.io-client").is_dir(), "run make to fetch socket.io-client"
        self.stderr = open(tmp / "soak-js.log", "wb")  # closed in stop()
        self.proc = subprocess.Popen([node, str(ROOT / "bench" / "soak.js"), url], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True, start_new_session=True,
                                     env={"NODE_PATH": str(NODE_MODULES), "PATH": "/usr/bin:/bin"})
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.send(json.dumps(entries))

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def next(self, kind: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            if line.get("type") == kind:
                return line

    def stop(self) -> None:
        terminate(self.proc, 5)
        self.stderr.close()


class Publisher:
    """R events/s in all, round-robin over the organizations, each (org, n) once.

    One thread per organization posts its events in order, each after the previous one's answer, so the
    order of n is the order the server accepted them in; a slow answer delays only that organization.
    """

    def __init__(self, url: str, orgs: list[str], rate: float) -> None:
        self.url, self.orgs, self.rate = url, orgs, rate
        self.queues: dict[str, queue.Queue[int | None]] = {org: queue.Queue() for org in orgs}
        self.records: dict[str, list[tuple[int, int | str, float, float]]] = {org: [] for org in orgs}
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._clock, daemon=True)]
        self.threads += [threading.Thread(target=self._post, args=(org,), daemon=True) for org in orgs]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(30)

    def _clock(self) -> None:
        counters = dict.fromkeys(self.orgs, 0)
        start, k = time.monotonic(), 0
        while not self.stopping.is_set():
            delay = start + k / self.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            org = self.orgs[k % len(self.orgs)]
            self.queues[org].put(counters[org])
            counters[org] += 1
            k += 1
        for q in self.queues.values():
            q.put(None)

    def _post(self, org: str) -> None:
        session = requests.Session()
        headers = {"Authorization": f"Bearer {API_KEY}"}
        while (n := self.queues[org].get()) is not None:
            sent = time.time()
            status: int | str
            try:
                with session.post(f"{self.url}/api/v1/organizations/{org}/events", headers=headers, timeout=5,
                                  json={"event": "news", "data": {"org": org, "n": n}}) as reply:
                    status = reply.status_code
            except requests.RequestException as exc:
                status = type(exc).__name__
            self.records[org].append((n, status, sent, time.time()))


# --- faults --------------------------------------------------------------------------------------------------


class Chaos:
    """The faults, one at a time; each returns what it did. Those aimed at an instance (or a worker) pick the
    one holding the most connections: after a fault nginx may send every reconnect to the other one."""

    def __init__(self, pg: ThrowawayPostgres, redis: ThrowawayRedis | None, instances: list[Instance],
                 nginx: subprocess.Popen[bytes]) -> None:
        self.pg, self.redis, self.instances, self.nginx = pg, redis, instances, nginx

    def kinds(self) -> list[str]:
        return [k for k in FAULTS if k != "redis-restart" or self.redis is not None]

    def run(self, kind: str) -> str:
        loads = {instance.name: instance.load() for instance in self.instances}
        instance = max(self.instances, key=lambda i: sum(loads[i.name].values()))
        held = f"{instance.name} (connections per worker: {loads})"
        assert instance.proc is not None
        if kind == "kill-worker":
            pid = max(loads[instance.name], key=lambda p: loads[instance.name][p])
            os.kill(pid, signal.SIGKILL)
            return f"SIGKILL worker {pid} of {held}"
        if kind == "hup-master":
            os.kill(instance.proc.pid, signal.SIGHUP)
            return f"SIGHUP master {instance.proc.pid} of {held}"
        if kind == "restart-instance":
            t = time.monotonic()
            instance.stop()
            stopped = time.monotonic() - t
            instance.start()
            return f"SIGTERM {held}: exited in {stopped:.1f} s, ready again {time.monotonic() - t:.1f} s after"
        if kind == "redis-restart":
            assert self.redis is not None
            port, persistent, root = self.redis.port, self.redis.persistent, self.redis.root
            self.redis.stop(keep=persistent)
            self.redis = ThrowawayRedis(port=port, persistent=persistent, root=root).start()
            return (f"redis-server on {port} stopped and started again "
                    f"({'with its append-only file' if persistent else 'empty'})")
        if kind == "pg-pause":
            self.pg.pause()
            try:
                time.sleep(5)
            finally:
                self.pg.resume()
            return "SIGSTOP postmaster and backends, SIGCONT 5 s later"
        if kind == "pg-terminate-listen":
            count = self.pg.psql("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                 "WHERE application_name = 'orgcast-listen'").strip()
            return f"pg_terminate_backend of {count} orgcast-listen connections"
        if kind == "nginx-reload":
            os.kill(self.nginx.pid, signal.SIGHUP)
            return f"SIGHUP nginx master {self.nginx.pid}"
        raise ValueError(kind)


# --- the figures ---------------------------------------------------------------------------------------------


def runs(values: list[int]) -> list[list[int]]:
    """[[first, last], …] of the stretches that go up by one: lossless, and short."""
    out: list[list[int]] = []
    for v in values:
        if out and v == out[-1][1] + 1:
            out[-1][1] = v
        else:
            out.append([v, v])
    return out


def analyse(sockets: list[dict[str, Any]], records: dict[str, list[Any]], faults: list[dict[str, Any]],
            t0: float) -> dict[str, Any]:
    accepted = {org: {n: done for n, status, _, done in recs if status == 202} for org, recs in records.items()}
    fault_times = [f["t"] for f in faults]

    def window(t: float) -> int:
        """Index of the fault that last began at or before t (−1: before the first)."""
        return bisect.bisect_right(fault_times, t) - 1

    per_window = [Counter() for _ in range(len(faults) + 1)]  # index w + 1
    f: Counter[str] = Counter()
    lost: list[dict[str, Any]] = []
    reach: dict[tuple[str, int], list[int]] = {}  # (org, n): [sockets expecting it, sockets that received it]
    reasons: Counter[str] = Counter()
    summary = []
    for rec in sockets:
        org, recv = rec["org"], rec["received"]
        f["sockets"] += 1
        f["connected_at_end"] += bool(rec["connected_at_end"])
        f["connect_errors"] += len(rec["connect_errors"])
        f["foreign"] += rec["foreign"]
        for d in rec["disconnects"]:
            reasons[d["reason"]] += 1
            per_window[window(d["t"]) + 1]["disconnects"] += 1
        for c in rec["connects"][1:]:
            f["reconnects"] += 1
            f["recovered"] += c["recovered"] is True
            per_window[window(c["t"]) + 1]["reconnects"] += 1
            per_window[window(c["t"]) + 1]["recovered"] += c["recovered"] is True
        summary.append({"org": org, "connects": rec["connects"], "disconnects": rec["disconnects"],
                        "connect_errors": rec["connect_errors"][:5], "received": runs(recv)})
        if not recv:
            f["sockets_without_events"] += 1
            continue
        counts = Counter(recv)
        f["duplicated"] += sum(c - 1 for c in counts.values() if c > 1)
        f["out_of_order_any"] += sum(1 for a, b in zip(recv, recv[1:], strict=False) if b < a)
        only_202 = [n for n in recv if n in accepted[org]]
        f["out_of_order"] += sum(1 for a, b in zip(only_202, only_202[1:], strict=False) if b < a)
        f["received_not_202"] += sum(c for n, c in counts.items() if n not in accepted[org])
        start = recv[0]
        expected = [n for n in accepted[org] if n >= start]
        f["expected"] += len(expected)
        # Gaps: (last n before the disconnect, first n after the reconnect, recovered or None: never back).
        gaps = [(recv[c["at"] - 1], recv[c["at"]] if c["at"] < len(recv) else float("inf"), c["recovered"] is True)
                for c in rec["connects"][1:] if c["at"] > 0]
        if rec["disconnects"] and not rec["connected_at_end"]:
            at = rec["disconnects"][-1]["at"]
            if at > 0:
                gaps.append((recv[at - 1], float("inf"), None))
        for n in expected:
            seen = reach.setdefault((org, n), [0, 0])
            seen[0] += 1
            if n in counts:
                seen[1] += 1
                continue
            gap = next((g for g in gaps if g[0] < n < g[1]), None)
            if gap is not None and gap[2] is not True:
                f["lost_in_gaps_not_recovered"] += 1
                per_window[window(accepted[org][n]) + 1]["excused"] += 1
                continue
            kind = "lost_across_recovered_reconnect" if gap is not None else "lost_while_connected"
            f[kind] += 1
            f["lost"] += 1
            per_window[window(accepted[org][n]) + 1]["lost"] += 1
            if len(lost) < 1000:
                lost.append({"socket": rec["index"], "org": org, "n": n, "kind": kind,
                             "accepted_s": round(accepted[org][n] - t0, 3)})
    f["delivered"] = f["expected"] - f["lost"] - f["lost_in_gaps_not_recovered"]
    unreached = [{"org": org, "n": n, "expected_by": e, "accepted_s": round(accepted[org][n] - t0, 3)}
                 for (org, n), (e, r) in sorted(reach.items(), key=lambda kv: accepted[kv[0][0]][kv[0][1]]) if not r]
    f["events_202_reaching_no_socket"] = len(unreached)
    for event in unreached:
        per_window[window(event["accepted_s"] + t0) + 1]["unreached"] += 1
    statuses = Counter(str(status) for recs in records.values() for _, status, _, _ in recs)
    for recs in records.values():
        for _, status, sent, _ in recs:
            per_window[window(sent) + 1]["refused"] += status != 202
    windows = [{"fault": "(before the first fault)", "t_s": 0.0, **per_window[0]}]
    windows += [{"fault": fl["kind"], "t_s": round(fl["t"] - t0, 1), "detail": fl["detail"], **per_window[i + 1]}
                for i, fl in enumerate(faults)]
    return {"figures": dict(f), "publishes": dict(statuses), "disconnect_reasons": dict(reasons),
            "by_fault": windows, "lost_events": lost, "unreached_events": unreached[:1000], "sockets": summary}


def log_counts(paths: list[Path]) -> dict[str, Any]:
    out: dict[str, Any] = {"traceback_lines": 0, "warning_lines": 0, "files": {}}
    for path in paths:
        text = path.read_text(errors="replace") if path.exists() else ""
        tracebacks = text.count("Traceback")
        warnings = sum(1 for line in text.splitlines() if re.search(r"\bWARNING\b", line))
        out["traceback_lines"] += tracebacks
        out["warning_lines"] += warnings
        out["files"][path.name] = {"tracebacks": tracebacks, "warnings": warnings, "problems": log_problems(path)}
    return out


def render(result: dict[str, Any]) -> str:
    f, pub, logs = result["figures"], result["publishes"], result["logs"]
    refused = sum(v for k, v in pub.items() if k != "202")
    reconnects = f.get("reconnects", 0)
    pct = f"{100 * f.get('recovered', 0) / reconnects:.1f} %" if reconnects else "—"
    rows = [
        ("sockets (connected at the end)", f"{f.get('sockets', 0)} ({f.get('connected_at_end', 0)})"),
        ("publishes answered 202 / refused", f"{pub.get('202', 0):,} / {refused:,} "
                                             f"{json.dumps({k: v for k, v in pub.items() if k != '202'})}"),
        ("deliveries expected", f"{f.get('expected', 0):,}"),
        ("delivered", f"{f.get('delivered', 0):,}"),
        ("lost on sockets that stayed connected", f"{f.get('lost_while_connected', 0):,}"),
        ("lost across a recovered reconnect", f"{f.get('lost_across_recovered_reconnect', 0):,}"),
        ("lost in gaps, not recovered (excused)", f"{f.get('lost_in_gaps_not_recovered', 0):,}"),
        ("events answered 202 that reached none of their sockets", f"{f.get('events_202_reaching_no_socket', 0):,}"),
        ("duplicated", f"{f.get('duplicated', 0):,}"),
        ("out of order (among events answered 202)", f"{f.get('out_of_order', 0):,}"),
        ("out of order (counting those not answered 202)", f"{f.get('out_of_order_any', 0):,}"),
        ("reconnects, recovered", f"{reconnects:,}, {f.get('recovered', 0):,} ({pct})"),
        ("connect errors (retried)", f"{f.get('connect_errors', 0):,}"),
        ("received though not answered 202", f"{f.get('received_not_202', 0):,}"),
        ("sockets that received nothing", f"{f.get('sockets_without_events', 0):,}"),
        ("gunicorn logs: Traceback / WARNING lines", f"{logs['traceback_lines']} / {logs['warning_lines']}"),
    ]
    lines = [f"chaos soak, {result['bus']} bus, {result['minutes']} min, {f.get('sockets', 0)} sockets, "
             f"{result['rate']} events/s, a fault every {result['fault_every']} s", "",
             "| figure | value |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += ["", "From each fault to the next (events by the time they were answered 202):", "",
              "| t s | fault | publishes refused | disconnects | reconnects (recovered) | lost "
              "| lost in gaps, not recovered | events no socket got |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {w['t_s']} | {w['fault']} | {w.get('refused', 0)} | {w.get('disconnects', 0)} | "
              f"{w.get('reconnects', 0)} ({w.get('recovered', 0)}) | {w.get('lost', 0)} | {w.get('excused', 0)} "
              f"| {w.get('unreached', 0)} |"
              for w in result["by_fault"]]
    lines += ["", "disconnect reasons: " + json.dumps(result["disconnect_reasons"])]
    return "\n".join(lines)


# --- the run -------------------------------------------------------------------------------------------------


def soak(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    pg = redis = nginx = sockets = None
    instances: list[Instance] = []
    chaos: Chaos | None = None
    try:
        pg = ThrowawayPostgres().start()
        fill_database(pg)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ORGCAST_", "REDIS_"))}
        env.update(DATABASE_URL=pg.dsn, ORGCAST_API_KEYS=API_KEY, WEB_CONCURRENCY="2",
                   ORGCAST_AUTH_FAILURES="100000", ORGCAST_MAX_PENDING_PER_ADDRESS="100000",
                   ORGCAST_TRUSTED_PROXIES="127.0.0.1", ORGCAST_ACCESS_LOG="false")
        if args.bus == "redis":
            # A Redis that carries a log keeps it (appendonly, fsync always) unless told otherwise:
            # an empty one gives a new epoch, and every socket is told recovered: false.
            redis = ThrowawayRedis(persistent=not args.redis_volatile).start()
            env["REDIS_URL"] = redis.url
        instances = [Instance(name, env, tmp) for name in ("a", "b")]
        for instance in instances:
            instance.start()
        nginx, nginx_port = start_nginx(tmp / "nginx", [i.port for i in instances])
        url = f"http://127.0.0.1:{nginx_port}"
        log(f"{args.bus} bus: instances on {[i.port for i in instances]}, nginx on {nginx_port}; logs in {tmp}")
        orgs = [f"soak-{i}" for i in range(ORGS)]
        entries = [{"token": f"soak-tok-{k % USERS}", "org": orgs[k % USERS % ORGS], "user": k % USERS}
                   for k in range(args.sockets)]
        sockets = Sockets(url, entries, tmp)
        ready = sockets.next("ready", 120)
        log(f"{ready['connected']} of {ready['sockets']} sockets connected")
        publisher = Publisher(url, orgs, args.rate)
        chaos = Chaos(pg, redis, instances, nginx)
        kinds, faults = chaos.kinds(), []
        t0 = time.time()
        publisher.start()
        end = t0 + args.minutes * 60
        due = t0 + args.fault_every / 2
        while due < end - 5:
            time.sleep(max(0.0, due - time.time()))
            kind = kinds[len(faults) % len(kinds)]
            started = time.time()
            detail = chaos.run(kind)
            faults.append({"kind": kind, "t": started, "end": time.time(), "detail": detail})
            log(f"t={started - t0:6.1f} s  {kind}: {detail}")
            due = max(due + args.fault_every, time.time())
        time.sleep(max(0.0, end - time.time()))
        publisher.stop()
        log("publisher stopped; 5 s for the last deliveries")
        time.sleep(5)
        sockets.send("report")
        report = sockets.next("report", 60)
    finally:
        if sockets is not None:
            sockets.stop()
        if nginx is not None:
            terminate(nginx, 10, signal.SIGQUIT)
        for instance in instances:
            instance.stop()
        redis = chaos.redis if chaos is not None else redis
        if redis is not None:
            redis.stop()
        if pg is not None:
            pg.stop()
    result = analyse(report["sockets"], publisher.records, faults, t0)
    return {"bus": args.bus, "minutes": args.minutes, "rate": args.rate, "fault_every": args.fault_every,
            "started": dt.datetime.fromtimestamp(t0).isoformat(timespec="seconds"),
            "faults": [{**fl, "t_s": round(fl["t"] - t0, 2), "end_s": round(fl["end"] - t0, 2)} for fl in faults],
            "logs": log_counts([i.log_path for i in instances]),
            "not_202": {org: [[n, s, round(a - t0, 3), round(b - t0, 3)] for n, s, a, b in recs if s != 202]
                        for org, recs in publisher.records.items()},
            **result}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bus", choices=("postgres", "redis"), default="postgres")
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--sockets", type=int, default=400)
    parser.add_argument("--rate", type=float, default=100.0, help="events/s in all (default 100)")
    parser.add_argument("--fault-every", type=float, default=20.0, help="seconds between faults (default 20)")
    parser.add_argument("--output", type=Path, help="default bench/results/<date>-soak-<bus>.json")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temporary folder of the logs")
    parser.add_argument("--redis-volatile", action="store_true",
                        help="Redis without its append-only file: a restart loses the log (the epoch case)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="orgcast-soak-"))
    try:
        result = soak(args, tmp)
    finally:
        if not args.keep_logs:
            shutil.rmtree(tmp, ignore_errors=True)
    print(render(result))
    log(f"wrote {save(result, results_path(f'soak-{args.bus}', args.output))}")
    f = result["figures"]
    return 1 if f.get("lost", 0) or f.get("duplicated", 0) or f.get("out_of_order", 0) else 0


if __name__ == "__main__":
    sys.exit(main())
