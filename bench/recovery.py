"""Fan-out with connection state recovery on and off (``bench/run.py recovery``): issue 9.

Issue 9 asks that "the fan-out benchmark figures are no more than 10 % below
those without recovery (measured side by side)". This runs the fanout5k and
fanout50x100 ladders of the side-by-side benchmark (loadgen-c, the same
sizes, steps and pass rules) against orgcast with ``ORGCAST_RECOVERY=true``
(its default: every publish is recorded in the history, and every event
carries its offset as its last argument) and ``ORGCAST_RECOVERY=false``,
alternating their order from round to round, on the Postgres bus (no
``REDIS_URL``) and, with ``--buses postgres,redis``, on the Redis bus.

loadgen-c's parser reads an event's ``"s"``, ``"t"`` and ``"o"`` fields from
the front of the frame and never looks past the data object, so the extra
trailing argument (``42["news",{...},"1234"]``) does not change its count.
Each run checks it: before the ladder, bench/loadgen.js (mode ``probe``)
receives one event and the run fails unless the frame ends with an offset
exactly when recovery is on.

Before each run the history is emptied (``orgcast.history``, ``..._trimmed``,
``orgcast.sessions``; Redis ``FLUSHALL``), so both settings start alike.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import time
from typing import Any

from common import (
    DISTURBED_PCT,
    CpuMeter,
    JsLoadGen,
    TempDir,
    build_loadgen_c,
    cpu_seconds,
    fmt,
    log,
    log_problems,
    pin_tree,
    print_footer,
    run_repeating,
    wait_quiet,
)
from report import median_or_none, results_path, save
from scenarios import Context, Fanout, fanout_metrics, run_fanout, sizes_for
from servers import Orgcast, ThrowawayPostgres, fill_database, versions

SCENARIOS = ("fanout5k", "fanout50x100")
SETTINGS = ("on", "off")
OFFSET_END = re.compile(r'\},"[0-9]+(-[0-9]+)?"\]$')  # the Postgres bus's ids; Redis stream ids are a-b


def run_recovery_bench(args: argparse.Namespace, argv: list[str], server_core: int | None,
                       lg_core: int | None) -> int:
    sizes = sizes_for(args)
    scenarios = [s for s in SCENARIOS if s in args.scenarios] or list(SCENARIOS)
    t0 = time.monotonic()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    tmp = TempDir("orgcast-bench-recovery-")
    pg: ThrowawayPostgres | None = None
    redis: Any = None
    runs: list[dict[str, Any]] = []
    try:
        loadgen_c = build_loadgen_c(tmp.path)
        pg = ThrowawayPostgres()
        pg.start()
        assert pg.proc is not None
        if lg_core is not None:
            pin_tree(pg.proc.pid, lg_core)
        fanouts = [sizes.fanout(s) for s in scenarios]
        fill_database(pg, max(f.sockets for f in fanouts), [1, *(f.rooms for f in fanouts)])
        if "redis" in args.buses:
            from throwaway import ThrowawayRedis

            redis = ThrowawayRedis().start()
            if lg_core is not None and redis.proc is not None:
                pin_tree(redis.proc.pid, lg_core)
        log(f"postgres on port {pg.port}; buses {', '.join(args.buses)}; scenarios {', '.join(scenarios)}")
        ctx = Context(args, sizes, tmp.path, loadgen_c, pg.proc.pid, server_core, lg_core)
        retries_left = args.retries
        for i in range(args.rounds):
            order = SETTINGS if i % 2 == 0 else SETTINGS[::-1]
            for bus in args.buses:
                for scenario in scenarios:
                    for setting in order:
                        retries_left = run_repeating(f"recovery {setting} {bus} {scenario}", runs, retries_left,
                                                     run_one, setting, bus, scenario, i + 1, ctx, pg, redis)
    finally:
        if redis is not None:
            redis.stop()
        if pg is not None:
            pg.stop()
        tmp.remove()

    summary = summarize(runs, args.buses, [sizes.fanout(s) for s in scenarios])
    table = render(summary, args.buses, [sizes.fanout(s) for s in scenarios], args.rounds)
    elapsed = time.monotonic() - t0
    kept = [r for r in runs if "discarded" not in r]
    noisy = [f"{r['setting']} {r['bus']} {r['scenario']} round {r['round']} (~{r['cpu']['other_work_pct']:.0f}%)"
             for r in kept if "error" not in r and (r["cpu"].get("other_work_pct") or 0) > DISTURBED_PCT]
    failed = [f"{r['setting']} {r['bus']} {r['scenario']} round {r['round']}: {str(r['error']).splitlines()[0]}"
              for r in runs if "error" in r]
    print()
    print(f"fan-out with ORGCAST_RECOVERY on and off: {args.rounds} round(s), medians"
          + (" (--quick sizes)" if args.quick else "") + f"; buses {', '.join(args.buses)}")
    print("one gunicorn worker on core 0; loadgen-c, Postgres (and Redis) on core 1" if server_core is not None
          else "processes not pinned (--no-pin)")
    print()
    print(table)
    print()
    print_footer(elapsed, runs, kept, noisy, failed)
    results = {
        "started": started, "elapsed_s": round(elapsed, 1), "command": " ".join(["bench/run.py", *argv]),
        "config": {"scenarios": scenarios, "buses": args.buses, "rounds": args.rounds, "step_s": sizes.step_s,
                   "factor": args.factor, "fanouts": [vars(f) for f in sizes.fanouts if f.name in scenarios]},
        "pinning": {"servers": server_core, "loadgen_postgres_redis_runner": lg_core},
        "environment": versions(None), "summary": summary, "table_markdown": table,
        "disturbed": noisy, "failed": failed, "runs": runs,
    }
    print(f"raw results: {save(results, results_path('recovery-quick' if args.quick else 'recovery', args.output))}")
    return 1 if failed else 0


def reset_history(pg: ThrowawayPostgres, redis_url: str | None) -> None:
    """Every run starts from an empty history and no kept sessions (the tables exist once
    orgcast has started once)."""
    pg.psql("DO $$ BEGIN IF to_regclass('orgcast.history') IS NOT NULL THEN "
            "TRUNCATE orgcast.history, orgcast.history_trimmed, orgcast.sessions; END IF; END $$")
    if redis_url is not None and shutil.which("redis-cli"):
        subprocess.run(["redis-cli", "-u", redis_url, "FLUSHALL"], check=True, capture_output=True)


def probe(server: Orgcast, setting: str, lg_core: int | None) -> str:
    """The raw frame of one delivered event: it ends with the offset exactly when recovery is on."""
    gen = JsLoadGen({"mode": "probe", "port": server.port, "orgs": 1, "trackPid": True}, lg_core, 20)
    try:
        got = gen.until_final()
    finally:
        gen.close()
    frame = str(got.get("frame") or "")
    if got.get("http_status") != 202 or not frame.startswith('42["news",{"s":0,'):
        raise RuntimeError(f"probe: no event delivered ({got})")
    if bool(OFFSET_END.search(frame)) != (setting == "on"):
        raise RuntimeError(f"probe: recovery {setting} but the frame is {frame!r}")
    return frame


def run_one(setting: str, bus: str, scenario: str, round_no: int, ctx: Context, pg: ThrowawayPostgres,
            redis: Any) -> dict[str, Any]:
    log(f"round {round_no}/{ctx.args.rounds}: {scenario}, {bus} bus, recovery {setting}")
    background = wait_quiet(ctx.args.wait_quiet)
    spec = ctx.sizes.fanout(scenario)
    server = Orgcast(pg.dsn, ctx.workdir, ctx.server_core,
                     label=f"orgcast-recovery-{setting}-{bus}-{scenario}-r{round_no}",
                     redis_url=redis.url if bus == "redis" else None,
                     env={"ORGCAST_RECOVERY": "true" if setting == "on" else "false"})
    t = time.monotonic()
    r: dict[str, Any] = {}
    try:
        reset_history(pg, redis.url if bus == "redis" else None)
        server.start()
        try:
            pid = server.measured_pid()
            r["probe_frame"] = probe(server, setting, ctx.lg_core)
            redis_pid = redis.proc.pid if bus == "redis" and redis is not None and redis.proc else None
            rc0 = cpu_seconds(redis_pid) if redis_pid else 0.0
            meter = CpuMeter(pid, ctx.pg_root)
            r.update(run_fanout(server, pid, spec, ctx))
            r["cpu"] = meter.lap()
            if redis_pid:
                r["cpu"]["redis_pct"] = round(100 * (cpu_seconds(redis_pid) - rc0) / r["cpu"]["wall_s"], 1)
        finally:
            server.stop()
        r["server_stop_s"] = server.stop_seconds
        got = r["server_log_problems"] = log_problems(server.logfile)
        if got["count"]:
            kinds = "; ".join(f"{n}× {k[:110]}" for k, n in list(got["kinds"].items())[:3])
            log(f"  recovery {setting} {bus} {scenario}: {got['count']} problem line(s) in the server's log: {kinds}")
    except (RuntimeError, TimeoutError, OSError, KeyError, ValueError, subprocess.CalledProcessError) as exc:
        log(f"  recovery {setting} {bus} {scenario}: FAILED: {exc}")
        r = {"error": str(exc)}
    r.update({"setting": setting, "bus": bus, "scenario": scenario, "round": round_no,
              "seconds": round(time.monotonic() - t, 1), "background_before": background})
    if "cpu" in r:
        log(f"  recovery {setting} {bus} {scenario}: {r['seconds']:.0f}s; postgres {fmt(r['cpu']['postgres_pct'], 0)}% "
            f"of a core over the run; other work ~{fmt(r['cpu'].get('other_work_pct'), 0)}%")
    return r


# --- figures --------------------------------------------------------------------------------


def step_by_target(r: dict[str, Any]) -> dict[float, dict[str, Any]]:
    """The ladder's steps by target rate (the last try of each: a repeated step's second)."""
    return {float(s["target_deliveries_per_s"]): s for s in r["loadgen_c"].get("steps") or []}


def figures(spec: Fanout, r: dict[str, Any]) -> dict[str, float | None]:
    m, marks = fanout_metrics(spec, r)
    out = dict(m)
    out["floor"] = 1.0 if marks.get("max") == "≥" else 0.0
    out["generator_bound"] = 1.0 if marks.get("max") == "g" else 0.0
    best = r["loadgen_c"].get("max_sustainable") or {}
    step = step_by_target(r).get(float(best.get("target_deliveries_per_s") or -1))
    pg_pct = (step or {}).get("cpu", {}).get("pg_pct")
    out["pg_pct_at_max"] = pg_pct
    out["pg_us_per_publish_at_max"] = (float(pg_pct) / 100 / float(out["publishes_at_max"]) * 1e6
                                       if pg_pct is not None and out.get("publishes_at_max") else None)
    out["pg_pct_run"] = r["cpu"].get("postgres_pct")
    # over every step, the overloaded ones too
    out["lost"] = float(sum(int(s.get("lost") or 0) + int(s.get("duplicates") or 0) + int(s.get("misdelivered") or 0)
                            for s in r["loadgen_c"].get("steps") or []))
    return out


def common_rate(runs: list[dict[str, Any]]) -> float | None:
    """The highest rate that every run (both settings) passed: Postgres's CPU is compared there."""
    passed: set[float] | None = None
    for r in runs:
        ok = {t for t, s in step_by_target(r).items() if s.get("pass")}
        passed = ok if passed is None else passed & ok
    return max(passed) if passed else None


def summarize(runs: list[dict[str, Any]], buses: list[str], fanouts: list[Fanout]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for bus in buses:
        for spec in fanouts:
            good = [r for r in runs if r["bus"] == bus and r["scenario"] == spec.name
                    and "error" not in r and "discarded" not in r]
            rate = common_rate(good)
            for setting in SETTINGS:
                mine = [r for r in good if r["setting"] == setting]
                got = [figures(spec, r) for r in mine]
                keys = list(got[0].keys()) if got else []
                entry = {k: median_or_none([g[k] for g in got]) for k in keys}
                entry["values_max"] = [g["max"] for g in got]
                entry["rounds"] = len(got)
                entry["common_rate"] = rate
                at = [step_by_target(r).get(rate) for r in mine] if rate is not None else []
                pg = [float(s["cpu"]["pg_pct"]) for s in at if s and s["cpu"].get("pg_pct") is not None]
                srv = [float(s["cpu"]["server_pct"]) for s in at if s and s["cpu"].get("server_pct") is not None]
                entry["pg_pct_at_common"] = median_or_none(list(pg))
                entry["server_pct_at_common"] = median_or_none(list(srv))
                out[f"{bus}/{spec.name}/{setting}"] = entry
    return out


ROWS = [
    ("max deliveries/s (p99 ≤ {limit} ms, none lost) ↑", "max", "ratio"),
    ("publishes/s at that rate ↑", "publishes_at_max", "ratio"),
    ("p50 ms at that rate ↓", "p50_at_max", "ratio"),
    ("p99 ms at that rate ↓", "p99_at_max", "ratio"),
    ("p50 / p99 ms at the first step ↓", ("p50_lowest", "p99_lowest"), "pair"),
    ("server CPU µs per delivery at max ↓", "cpu_us_at_max", "ratio"),
    ("server CPU % at {common} deliveries/s (both passed) ↓", "server_pct_at_common", "ratio"),
    ("Postgres CPU % at {common} deliveries/s (both passed) ↓", "pg_pct_at_common", "ratio"),
    ("Postgres CPU % at each one's max ↓", "pg_pct_at_max", "ratio"),
    ("Postgres CPU µs per publish at max ↓", "pg_us_per_publish_at_max", "ratio"),
    ("Postgres CPU % over the whole run ↓", "pg_pct_run", "ratio"),
    ("deliveries lost, duplicated or misdelivered, every step ↓", "lost", "ratio"),
]


def _v(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.1f}" if abs(v) >= 1 or v == 0 else f"{v:,.2f}"


def render(summary: dict[str, Any], buses: list[str], fanouts: list[Fanout], rounds: int) -> str:
    lines = ["| bus | fan-out | metric | recovery on | recovery off | on ÷ off |", "|---|---|---|---:|---:|---:|"]
    for bus in buses:
        for spec in fanouts:
            on, off = summary[f"{bus}/{spec.name}/on"], summary[f"{bus}/{spec.name}/off"]
            common = on.get("common_rate")
            for label, key, how in ROWS:
                if key == "publishes_at_max" and spec.rooms == 1:
                    continue
                if key in ("server_pct_at_common", "pg_pct_at_common") and common is None:
                    continue
                text = label.format(limit=f"{spec.p99_limit_ms:.0f}", common=f"{common:,.0f}" if common else "")
                if how == "pair":
                    a = " / ".join(_v(on.get(k)) for k in key)
                    b = " / ".join(_v(off.get(k)) for k in key)
                    ratio = "—"
                else:
                    x, y = on.get(key), off.get(key)
                    a, b = _v(x), _v(y)
                    if key == "max":
                        a = ("≥ " if on.get("floor") else "") + a + (" ᵍ" if on.get("generator_bound") else "")
                        b = ("≥ " if off.get("floor") else "") + b + (" ᵍ" if off.get("generator_bound") else "")
                    ratio = f"{x / y:.2f}×" if x is not None and y else "—"
                lines.append(f"| {bus} | {spec.label} | {text} | {a} | {b} | {ratio} |")
            if min(on["rounds"], off["rounds"]) < rounds:
                lines.append(f"| {bus} | {spec.label} | (rounds that gave a value: on {on['rounds']}/{rounds}, "
                             f"off {off['rounds']}/{rounds}) | | | |")
    return "\n".join(lines)
