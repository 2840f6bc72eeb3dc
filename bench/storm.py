"""The reconnect storm (``bench/run.py storm``): issue 8.

5,000 sockets of 50 users (one token each, 100 sockets per token, all
members of organization 1) connect at once to a fresh server (cold auth
cache): what Postgres executed (pg_stat_statements, reset just before) and
the time from the first open to the last CONNECT ack. Then, for orgcast, a
real restart: ``kill -HUP`` to the gunicorn master (a graceful reload: new
workers, and the old ones close every session), every client reconnecting
at once with the ``pid`` of its CONNECT ack as socket.io-client 4.6+ does;
the same figures again, from the signal to the last reconnect's ack.

Variants, side by side in alternating rounds: orgcast with its default
``ORGCAST_AUTH_CACHE_TTL``, with ``ORGCAST_AUTH_CACHE_TTL=0`` (coalescing
only), each with WEB_CONCURRENCY=2 (and 1), and node-seed as a yardstick.
The server's processes are pinned to core 0; the generator (bench/loadgen.js)
and Postgres to core 1.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from common import (
    DISTURBED_PCT,
    CpuMeter,
    JsLoadGen,
    TempDir,
    children,
    log,
    log_problems,
    log_size,
    pin_tree,
    print_footer,
    run_repeating,
    tree_cpu_seconds,
    wait_quiet,
)
from recovery import reset_history
from report import median_or_none, results_path, save
from servers import NodeSeed, Orgcast, Server, StatsPostgres, fill_database, prepare_node_seed, versions

#: what the storm needs of orgcast's limits: every client is 127.0.0.1 with up to 5,000
#: handshakes pending (above the per-address limit of 50 meant for real clients); no
#: failure should ever be counted, but a high limit keeps a stray one from refusing the rest
STORM_ENV = {
    "ORGCAST_MAX_PENDING_PER_ADDRESS": "10000",
    "ORGCAST_AUTH_FAILURES": "1000000",
    "ORGCAST_WORKER_CONNECTIONS": "16000",
}


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    server: str  # orgcast or node-seed
    workers: int = 1
    env: dict[str, str] = field(default_factory=dict)
    redis: bool = False  # REDIS_URL set: the bus, the history and the kept sessions in Redis


def variants_for(workers: list[int], kinds: list[str]) -> list[Variant]:
    out = []
    for w in workers:
        if "default" in kinds:
            out.append(Variant(f"default-w{w}", f"orgcast, default TTL, {w} worker{'s' if w > 1 else ''}",
                               "orgcast", w))
        if "ttl0" in kinds:
            out.append(Variant(f"ttl0-w{w}", f"orgcast, TTL=0, {w} worker{'s' if w > 1 else ''}", "orgcast", w,
                               {"ORGCAST_AUTH_CACHE_TTL": "0"}))
        if "redis" in kinds:
            out.append(Variant(f"redis-w{w}", f"orgcast, default TTL, REDIS_URL, {w} worker{'s' if w > 1 else ''}",
                               "orgcast", w, redis=True))
    if "node-seed" in kinds:
        out.append(Variant("node-seed", "node-seed", "node-seed"))
    return out


def tally(statements: list[dict[str, Any]]) -> dict[str, int]:
    """Calls by kind. orgcast's connect check is ONE statement (the token SQL as a CTE,
    the membership SQL an EXISTS over it): it counts as a token and a membership lookup."""
    out = {"token_lookups": 0, "membership_lookups": 0, "auth_statements": 0, "recovery_statements": 0,
           "other_statements": 0, "statements": 0}
    for st in statements:
        q, calls = str(st["query"]).lower(), int(st["calls"])
        token, member = "oauth_access_tokens" in q, "organization_users" in q
        out["statements"] += calls
        out["token_lookups"] += calls if token else 0
        out["membership_lookups"] += calls if member else 0
        if token or member:
            out["auth_statements"] += calls
        elif re.search(r"orgcast\.(history|sessions)", q):
            out["recovery_statements"] += calls
        else:
            out["other_statements"] += calls
    return out


def run_storm_bench(args: argparse.Namespace, argv: list[str], server_core: int | None,
                    lg_core: int | None) -> int:
    if not StatsPostgres.available():
        raise SystemExit("bench: pg_stat_statements is not installed (it ships with Debian's postgresql package)")
    users = args.storm_users or (10 if args.quick else 50)
    per_user = args.storm_sockets_per_user
    sockets = users * per_user
    inflight = min(args.storm_inflight, sockets)
    variants = variants_for(args.storm_workers, args.storm_variants)
    restart = not args.no_restart
    t0 = time.monotonic()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    tmp = TempDir("orgcast-bench-storm-")
    pg: StatsPostgres | None = None
    redis: Any = None
    runs: list[dict[str, Any]] = []
    try:
        seed = prepare_node_seed(tmp.path) if any(v.server == "node-seed" for v in variants) else None
        environment = versions(seed)
        pg = StatsPostgres()
        pg.start()
        assert pg.proc is not None
        if lg_core is not None:
            pin_tree(pg.proc.pid, lg_core)
        pg.enable_statements()
        fill_database(pg, users, [1])
        if any(v.redis for v in variants):
            from throwaway import ThrowawayRedis

            redis = ThrowawayRedis().start()
            if lg_core is not None and redis.proc is not None:
                pin_tree(redis.proc.pid, lg_core)
        log(f"postgres on port {pg.port} with pg_stat_statements; {users} users, one token each, all in "
            f"organization 1; {sockets} sockets ({per_user} per token), {inflight} in flight")
        retries_left = args.retries
        for i in range(args.rounds):
            order = variants if i % 2 == 0 else variants[::-1]
            for v in order:
                retries_left = run_repeating(v.key, runs, retries_left, run_one, v, i + 1, args, pg,
                                             redis.url if v.redis else None, tmp, server_core, lg_core, users,
                                             sockets, inflight, restart)
    finally:
        if redis is not None:
            redis.stop()
        if pg is not None:
            pg.stop()
        tmp.remove()

    summary = summarize(runs, variants)
    table = render(summary, variants, args.rounds, restart)
    elapsed = time.monotonic() - t0
    kept = [r for r in runs if "discarded" not in r]
    noisy = [f"{r['variant']} round {r['round']} (~{r['cpu']['other_work_pct']:.0f}%)" for r in kept
             if "error" not in r and (r["cpu"].get("other_work_pct") or 0) > DISTURBED_PCT]
    failed = [f"{r['variant']} round {r['round']}: {str(r['error']).splitlines()[0]}" for r in runs if "error" in r]
    print()
    print(f"reconnect storm: {sockets:,} sockets of {users} users (one token each, {per_user} sockets per token, "
          f"one organization), {inflight:,} connects in flight; {args.rounds} round(s), medians"
          + (" (--quick sizes)" if args.quick else ""))
    print("server processes on core 0; load generator and Postgres on core 1" if server_core is not None
          else "processes not pinned (--no-pin)")
    print()
    print(table)
    print()
    print_footer(elapsed, runs, kept, noisy, failed)
    results = {
        "started": started, "elapsed_s": round(elapsed, 1), "command": " ".join(["bench/run.py", *argv]),
        "config": {"users": users, "sockets_per_user": per_user, "sockets": sockets, "in_flight": inflight,
                   "organizations": 1, "rounds": args.rounds, "restart": restart, "orgcast_env": STORM_ENV,
                   "variants": [vars(v) for v in variants]},
        "pinning": {"servers": server_core, "loadgen_postgres_runner": lg_core},
        "environment": environment, "summary": summary, "table_markdown": table,
        "disturbed": noisy, "failed": failed, "runs": runs,
    }
    print(f"raw results: {save(results, results_path('storm-quick' if args.quick else 'storm', args.output))}")
    return 1 if failed else 0


def run_one(v: Variant, round_no: int, args: argparse.Namespace, pg: StatsPostgres, redis_url: str | None,
            tmp: TempDir,
            server_core: int | None, lg_core: int | None, users: int, sockets: int, inflight: int,
            restart: bool) -> dict[str, Any]:
    log(f"round {round_no}/{args.rounds}: {v.label}")
    background = wait_quiet(args.wait_quiet)
    label = f"{v.key}-r{round_no}"
    server: Server
    if v.server == "orgcast":
        server = Orgcast(pg.dsn, tmp.path, server_core, label=label, redis_url=redis_url,
                         env={**STORM_ENV, **v.env}, workers=v.workers)
    else:
        server = NodeSeed(pg.dsn, tmp.path, server_core, label=label)
    t = time.monotonic()
    try:
        r = storm(v, server, pg, lg_core, users, sockets, inflight, restart and v.server == "orgcast")
    except (RuntimeError, TimeoutError, OSError, KeyError, ValueError) as exc:
        log(f"  {v.key}: FAILED: {exc}")
        r = {"error": str(exc)}
    r["server_log_problems"] = log_problems(server.logfile)
    marks = r.pop("log_marks", None)
    if marks:
        # the same, by phase: start-up and storm, the reload, the clients' close and the stop
        r["server_log_problems"]["by_phase"] = {
            name: log_problems(server.logfile, a, b) for name, a, b in
            (("storm", 0, marks.get("storm_end")), ("reload", marks.get("storm_end", 0), marks.get("reload_end")),
             ("close_and_stop", marks.get("reload_end", marks.get("storm_end", 0)), None))}
    r.update({"variant": v.key, "label": v.label, "round": round_no, "seconds": round(time.monotonic() - t, 1),
              "background_before": background})
    for phase, got in (r["server_log_problems"].get("by_phase") or {"all": r["server_log_problems"]}).items():
        if got["count"]:
            kinds = "; ".join(f"{n}× {k[:110]}" for k, n in list(got["kinds"].items())[:3])
            log(f"  {v.key}: {got['count']} problem line(s) in the server's log ({phase}): {kinds}")
    return r


def storm(v: Variant, server: Server, pg: StatsPostgres, lg_core: int | None, users: int, sockets: int,
          inflight: int, restart: bool) -> dict[str, Any]:
    assert pg.proc is not None
    reset_history(pg, server.redis_url if isinstance(server, Orgcast) else None)
    server.start()
    gen: JsLoadGen | None = None
    result: dict[str, Any] = {"log_marks": {}}
    try:
        assert server.proc is not None
        master = server.proc.pid
        workers = server.worker_pids() if isinstance(server, Orgcast) else [master]
        time.sleep(1.0)  # start-up statements (schema check, LISTEN, the leader's first clean-up) are done
        meter = CpuMeter(None, pg.proc.pid)
        pg.reset_statements()
        s0, p0 = tree_cpu_seconds(master), tree_cpu_seconds(pg.proc.pid)
        gen = JsLoadGen({"mode": "storm", "port": server.port, "orgs": 1, "users": users, "sockets": sockets,
                         "concurrency": inflight, "trackPid": True, "connectTimeoutMs": 30000,
                         "restartTimeoutMs": 40000}, lg_core, 150)
        connect = gen.read()
        s1, p1 = tree_cpu_seconds(master), tree_cpu_seconds(pg.proc.pid)
        statements = pg.statements()
        connect["cpu"] = meter.lap()
        connect["server_cpu_s"], connect["postgres_cpu_s"] = round(s1 - s0, 3), round(p1 - p0, 3)
        connect["statements"] = statements
        connect["tally"] = tally(statements)
        result["storm"] = connect
        result["log_marks"]["storm_end"] = log_size(server.logfile)
        c = connect["tally"]
        log(f"  {v.key}: {connect['ok']}/{connect['attempted']} admitted in {connect['elapsed_s']:.2f}s, errors "
            f"{connect['errors']}; auth p50 {connect['auth_ms']['p50']:.0f} p99 {connect['auth_ms']['p99']:.0f} ms; "
            f"postgres: {c['token_lookups']} token, {c['membership_lookups']} membership lookups, "
            f"{c['statements']} statements; cpu s: server {s1 - s0:.2f}, postgres {p1 - p0:.2f}")
        if restart and isinstance(server, Orgcast):
            time.sleep(1.0)
            result["restart"] = hup_restart(v, server, gen, pg, master, workers)
            result["log_marks"]["reload_end"] = log_size(server.logfile)
        gen.send("stop")
        final = gen.until_final()
        result["final"] = final
        result["cpu"] = meter.lap()
        result["cpu"]["other_work_pct"] = max(float(connect["cpu"].get("other_work_pct") or 0.0),
                                              float((result.get("restart") or {}).get("cpu", {})
                                                    .get("other_work_pct") or 0.0))
    finally:
        if gen is not None:
            gen.close()
        server.stop()
    result["server_stop_s"] = server.stop_seconds
    return result


def hup_restart(v: Variant, server: Orgcast, gen: JsLoadGen, pg: StatsPostgres, master: int,
                old_workers: list[int]) -> dict[str, Any]:
    """``kill -HUP`` the master; every closed client reconnects at once (loadgen.js "watch")."""
    assert pg.proc is not None
    meter = CpuMeter(None, pg.proc.pid)
    pg.reset_statements()
    s0, p0 = tree_cpu_seconds(master), tree_cpu_seconds(pg.proc.pid)
    gen.send("watch")
    armed = gen.read()
    if armed.get("phase") != "armed":
        raise RuntimeError(f"loadgen.js: expected armed, got {armed}")
    old = set(old_workers)
    gone: dict[str, float] = {}

    def watch() -> None:
        # The old workers' exit, watched while the clients come back (bounded).
        while time.monotonic() < t_hup + 30:
            if not old & set(children(master)):
                gone["s"] = round(time.monotonic() - t_hup, 2)
                return
            time.sleep(0.02)

    t_hup = time.monotonic()
    os.kill(master, signal.SIGHUP)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    back = gen.read()
    t_back = time.monotonic()
    watcher.join(timeout=31)
    old_gone_s = gone.get("s")
    time.sleep(0.5)
    s1, p1 = tree_cpu_seconds(master), tree_cpu_seconds(pg.proc.pid)
    statements = pg.statements()
    new_workers = children(master)
    back.update({"cpu": meter.lap(), "server_cpu_s": round(s1 - s0, 3), "postgres_cpu_s": round(p1 - p0, 3),
                 "statements": statements, "tally": tally(statements), "runner_hup_to_line_s":
                 round(t_back - t_hup, 3), "old_workers_exited_s": old_gone_s,
                 "old_workers": sorted(old), "new_workers": new_workers})
    c = back["tally"]
    log(f"  {v.key} restart: {back['reconnected']}/{back['sockets']} back ({back['recovered']} recovered) "
        f"{(back['last_ack_ms'] or 0) / 1000:.2f}s after HUP "
        f"(first close at {(back['first_drop_ms'] or 0) / 1000:.2f}s)"
        f"; errors {back['errors']}, closes {back['close_reasons']}; postgres: {c['token_lookups']} token, "
        f"{c['membership_lookups']} membership, {c['recovery_statements']} recovery, {c['statements']} statements; "
        f"old workers gone after {old_gone_s}s")
    return back


# --- summary and table ------------------------------------------------------------------


def figures(r: dict[str, Any]) -> dict[str, float | None]:
    s = r["storm"]
    c = s["tally"]
    n = s["ok"] or None
    out: dict[str, float | None] = {
        "admitted": float(s["ok"]),
        "connect_errors": float(sum(s["errors"].values())),
        "storm_s": s["elapsed_s"],
        "admitted_per_s": s["connects_per_s"],
        "auth_p50": s["auth_ms"]["p50"], "auth_p99": s["auth_ms"]["p99"],
        "token_lookups": float(c["token_lookups"]), "membership_lookups": float(c["membership_lookups"]),
        "auth_statements": float(c["auth_statements"]), "recovery_statements": float(c["recovery_statements"]),
        "statements": float(c["statements"]),
        "server_cpu_us_per_connect": s["server_cpu_s"] / n * 1e6 if n else None,
        "postgres_cpu_ms": s["postgres_cpu_s"] * 1000,
    }
    rs = r.get("restart")
    if rs:
        rc = rs["tally"]
        out.update({
            "r_back": float(rs["reconnected"]), "r_recovered": float(rs["recovered"]),
            "r_not_back": float(rs["sockets"] - rs["reconnected"]),
            "r_errors": float(sum(rs["errors"].values())),
            "r_last_ack_s": rs["last_ack_ms"] / 1000 if rs["last_ack_ms"] is not None else None,
            "r_first_drop_s": rs["first_drop_ms"] / 1000 if rs["first_drop_ms"] is not None else None,
            "r_first_ack_s": rs["first_ack_ms"] / 1000 if rs.get("first_ack_ms") is not None else None,
            "r_drop_to_ack_s": rs["drop_to_last_ack_ms"] / 1000 if rs["drop_to_last_ack_ms"] is not None else None,
            "r_p50": rs["reconnect_ms"]["p50"], "r_p99": rs["reconnect_ms"]["p99"],
            "r_token_lookups": float(rc["token_lookups"]), "r_membership_lookups": float(rc["membership_lookups"]),
            "r_recovery_statements": float(rc["recovery_statements"]), "r_statements": float(rc["statements"]),
            "r_postgres_cpu_ms": rs["postgres_cpu_s"] * 1000,
            "r_old_exit_s": rs["old_workers_exited_s"],
        })
    return out


def summarize(runs: list[dict[str, Any]], variants: list[Variant]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for v in variants:
        got = [figures(r) for r in runs if r["variant"] == v.key and "error" not in r and "discarded" not in r]
        keys = dict.fromkeys(k for g in got for k in g)
        out[v.key] = {k: {"median": median_or_none([g.get(k) for g in got]),
                          "min": min((g[k] for g in got if g.get(k) is not None), default=None),
                          "max": max((g[k] for g in got if g.get(k) is not None), default=None)}
                      for k in keys} | {"rounds": len(got)}
    return out


STORM_ROWS = [
    ("sockets admitted (of all opened) ↑", "admitted", "range"),
    ("connect errors ↓", "connect_errors", "int"),
    ("first open → last CONNECT ack, s ↓", "storm_s", "s"),
    ("admitted/s ↑", "admitted_per_s", "int"),
    ("auth p50 / p99 ms (open → ack) ↓", ("auth_p50", "auth_p99"), "pair"),
    ("Postgres: token lookups executed ↓", "token_lookups", "range"),
    ("Postgres: membership lookups executed ↓", "membership_lookups", "range"),
    ("Postgres: auth statements (round trips) ↓", "auth_statements", "range"),
    ("Postgres: recovery statements ↓", "recovery_statements", "range"),
    ("Postgres: statements in all ↓", "statements", "range"),
    ("server CPU µs per connect ↓", "server_cpu_us_per_connect", "int"),
    ("Postgres CPU ms during the storm ↓", "postgres_cpu_ms", "int"),
]
RESTART_ROWS = [
    ("sockets back (of all closed) ↑", "r_back", "range"),
    ("… of them recovered (same pid) ↑", "r_recovered", "range"),
    ("sockets not back, failed attempts ↓", ("r_not_back", "r_errors"), "pair"),
    ("HUP → first close, s", "r_first_drop_s", "s"),
    ("HUP → first reconnect's ack, s", "r_first_ack_s", "s"),
    ("HUP → last CONNECT ack, s ↓", "r_last_ack_s", "s"),
    ("first close → last ack, s ↓", "r_drop_to_ack_s", "s"),
    ("reconnect p50 / p99 ms (close → ack) ↓", ("r_p50", "r_p99"), "pair"),
    ("Postgres: token lookups executed ↓", "r_token_lookups", "range"),
    ("Postgres: membership lookups executed ↓", "r_membership_lookups", "range"),
    ("Postgres: recovery statements ↓", "r_recovery_statements", "range"),
    ("Postgres: statements in all ↓", "r_statements", "range"),
    ("Postgres CPU ms, HUP → all back ↓", "r_postgres_cpu_ms", "int"),
    ("HUP → old workers exited, s ↓", "r_old_exit_s", "s"),
]


def _num(v: float | None, how: str) -> str:
    if v is None:
        return "—"
    if how == "s":
        return f"{v:.2f}"
    if abs(v) >= 100 or how in ("int", "range") or float(v).is_integer():
        return f"{v:,.0f}"
    return f"{v:,.1f}"


def _cell(stats: dict[str, Any], key: Any, how: str) -> str:
    if how == "pair":
        return " / ".join(_num((stats.get(k) or {}).get("median"), "x") for k in key)
    e = stats.get(key) or {}
    text = _num(e.get("median"), how)
    if how == "range" and e.get("min") is not None and e["min"] != e["max"]:
        text += f" ({e['min']:,.0f}–{e['max']:,.0f})"
    return text


def render(summary: dict[str, Any], variants: list[Variant], rounds: int, restart: bool) -> str:
    head = "| | " + " | ".join(v.label for v in variants) + " |"
    sep = "|---|" + "---:|" * len(variants)
    lines = ["**The storm: all sockets connect to a fresh server**", "", head, sep]
    for label, key, how in STORM_ROWS:
        lines.append(f"| {label} | " + " | ".join(_cell(summary[v.key], key, how) for v in variants) + " |")
    short = [v for v in variants if summary[v.key]["rounds"] < rounds]
    if short:
        lines.append("| (rounds that gave a value) | " + " | ".join(
            f"{summary[v.key]['rounds']}/{rounds}" for v in variants) + " |")
    real = [v for v in variants if v.server == "orgcast"]
    if restart and real:
        lines += ["", "**A real restart: `kill -HUP` the master once they are all connected; every client "
                  "reconnects at once with its pid**", "",
                  "| | " + " | ".join(v.label for v in real) + " |", "|---|" + "---:|" * len(real)]
        for label, key, how in RESTART_ROWS:
            lines.append(f"| {label} | " + " | ".join(_cell(summary[v.key], key, how) for v in real) + " |")
    return "\n".join(lines)
