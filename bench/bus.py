"""The bus benchmark (``bench/run.py bus``): orgcast only.

How many events/s one publisher pushes through to sockets held by ANOTHER
orgcast process, and the delivery latency that adds, for each bus:

- ``single``: one gunicorn instance (one worker); bench/loadgen.js holds the
  sockets on it and publishes to it. Every publish still goes through the bus
  (NOTIFY or PUBLISH, heard back by the worker's listener).
- ``cross``: two instances sharing the database (and Redis): the sockets on
  B, the publishes to A. A's worker hears its own messages too (and drops
  them: it has no sockets).

Postgres bus: no ``REDIS_URL``. Redis bus: ``REDIS_URL`` of a throwaway
redis-server. Both instances are pinned to core 0, as the single one is:
the comparison is for the same CPU. Each step publishes at a fixed rate
(open loop, round-robin over the rooms) for a few seconds; a step passes
with every delivery made once, every publish answered 202 and p99 ≤ 200 ms.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from common import (
    DISTURBED_PCT,
    CpuMeter,
    JsLoadGen,
    TempDir,
    fmt,
    log,
    pin_tree,
    print_footer,
    run_repeating,
    wait_quiet,
)
from report import median_or_none, results_path, save
from servers import Orgcast, ThrowawayPostgres, fill_database, versions

TOPOLOGIES = ("single", "cross")
DEFAULT_RATES = (50, 100, 200, 400, 700, 1000, 1400, 2000, 2800, 4000, 5600)
#: 10 sockets per event: the generator receives 10 deliveries per publish, so at
#: thousands of events/s it is the publish path and the bus that are measured (with
#: 100 per event, loadgen.js's core was the limit near 1,400 events/s)
DEFAULT_ROOMS = 50
#: a failing step with the generator above this (percent of its core) may be its limit
GENERATOR_BOUND_PCT = 80.0
QUICK_RATES = (50, 200)


def run_bus_bench(args: argparse.Namespace, argv: list[str], server_core: int | None,
                  lg_core: int | None) -> int:
    sockets = args.bus_sockets or (200 if args.quick else 500)
    rooms = args.bus_rooms or DEFAULT_ROOMS
    rates = ([float(x) for x in args.bus_rates.split(",") if x.strip()] if args.bus_rates
             else list(QUICK_RATES if args.quick else DEFAULT_RATES))
    refs = ([float(x) for x in args.bus_ref_rates.split(",") if x.strip()] if args.bus_ref_rates
            else [50.0, 200.0] if args.quick else [100.0, 400.0])
    if set(refs) - set(rates):
        raise SystemExit(f"bench: --bus-ref-rates {refs} must be among the rates {rates}")
    step_s = args.step_s or (2.0 if args.quick else 4.0)
    t0 = time.monotonic()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    load = {"sockets": sockets, "orgs": rooms, "steps": rates, "stepS": step_s}
    tmp = TempDir("orgcast-bench-bus-")
    pg: ThrowawayPostgres | None = None
    redis: Any = None
    runs: list[dict[str, Any]] = []
    try:
        pg = ThrowawayPostgres()
        pg.start()
        assert pg.proc is not None
        if lg_core is not None:
            pin_tree(pg.proc.pid, lg_core)
        fill_database(pg, sockets, [rooms])
        redis_url = None
        if "redis" in args.buses:
            from throwaway import ThrowawayRedis

            redis = ThrowawayRedis().start()
            redis_url = redis.url
            if lg_core is not None and redis.proc is not None:
                pin_tree(redis.proc.pid, lg_core)
        retries_left = args.retries
        for i in range(args.rounds):
            for bus in args.buses:
                for topology in (TOPOLOGIES if i % 2 == 0 else TOPOLOGIES[::-1]):
                    retries_left = run_repeating(f"{bus} {topology}", runs, retries_left, run_one, bus, topology,
                                                 i + 1, args, pg, redis_url if bus == "redis" else None, tmp,
                                                 server_core, lg_core, load, other=other_work)
    finally:
        if redis is not None:
            redis.stop()
        if pg is not None:
            pg.stop()
        tmp.remove()

    summary = summarize(runs, args.buses, refs)
    table = render(summary, refs, args.rounds)
    elapsed = time.monotonic() - t0
    failed = [f"{r['bus']} {r['topology']} round {r['round']}: {r['error'].splitlines()[0] if r['error'] else ''}"
              for r in runs if "error" in r]
    kept = [r for r in runs if "discarded" not in r]
    noisy = [f"{r['bus']} {r['topology']} round {r['round']} (~{other_work(r):.0f}%)" for r in kept
             if "error" not in r and other_work(r) > DISTURBED_PCT]
    print()
    print(f"orgcast's bus: {sockets} sockets in {rooms} rooms, {args.rounds} round(s), medians"
          + (" (--quick sizes)" if args.quick else ""))
    print("orgcast instances (one worker each) on core 0; load generator, Postgres and Redis on core 1"
          if server_core is not None else "processes not pinned (--no-pin)")
    print()
    print(table)
    print()
    print_footer(elapsed, runs, kept, noisy, failed)
    results = {
        "started": started, "elapsed_s": round(elapsed, 1), "command": " ".join(["bench/run.py", *argv]),
        "config": {"sockets": sockets, "rooms": rooms, "rates": rates, "ref_rates": refs, "step_s": step_s,
                   "rounds": args.rounds, "buses": args.buses},
        "pinning": {"servers": server_core, "loadgen_postgres_redis_runner": lg_core},
        "environment": versions(None), "summary": summary, "table_markdown": table,
        "disturbed": noisy, "failed": failed, "runs": runs,
    }
    print(f"raw results: {save(results, results_path('bus-quick' if args.quick else 'bus', args.output))}")
    return 1 if failed else 0


def other_work(r: dict[str, Any]) -> float:
    """The most other work (percent of a core) in the whole run or in any step up to the
    first failure: those steps decide the max."""
    worst = float((r.get("cpu") or {}).get("other_work_pct") or 0.0)
    for s in r.get("steps", []):
        worst = max(worst, float((s.get("cpu") or {}).get("other_work_pct") or 0.0))
        if not s.get("pass") and not s.get("retried"):
            break
    return worst


def run_one(bus: str, topology: str, round_no: int, args: argparse.Namespace, pg: ThrowawayPostgres,
            redis_url: str | None, tmp: TempDir, server_core: int | None, lg_core: int | None,
            load: dict[str, Any]) -> dict[str, Any]:
    log(f"round {round_no}/{args.rounds}: {bus} bus, {topology}")
    background = wait_quiet(args.wait_quiet)
    t = time.monotonic()
    assert pg.proc is not None
    try:
        r = run_bus(bus, topology, pg.dsn, redis_url, tmp, server_core, lg_core, pg.proc.pid, load)
    except (RuntimeError, TimeoutError, OSError, KeyError, ValueError) as exc:
        log(f"  {bus} {topology}: FAILED: {exc}")
        r = {"error": str(exc)}
    r.update({"bus": bus, "topology": topology, "round": round_no, "seconds": round(time.monotonic() - t, 1),
              "background_before": background})
    return r


def run_bus(bus: str, topology: str, dsn: str, redis_url: str | None, tmp: TempDir, server_core: int | None,
            lg_core: int | None, pg_root: int, load: dict[str, Any]) -> dict[str, Any]:
    a = Orgcast(dsn, tmp.path, server_core, label=f"orgcast-{bus}-{topology}-A", redis_url=redis_url)
    b = Orgcast(dsn, tmp.path, server_core, label=f"orgcast-{bus}-{topology}-B", redis_url=redis_url) \
        if topology == "cross" else None
    servers = [s for s in (a, b) if s is not None]
    gen: JsLoadGen | None = None
    try:
        for s in servers:
            s.start()  # ready: /readyz 200, i.e. the bus listener is up
        pids = {s.label[-1]: s.measured_pid() for s in servers}
        receiver = b or a
        meter = CpuMeter(None, pg_root)
        gen = JsLoadGen({"mode": "bus", "port": receiver.port, "publishPort": a.port, "p99LimitMs": 200,
                         "drainMs": 3000, **load}, lg_core, 60 + len(load["steps"]) * 2 * (load["stepS"] + 4))
        connected = gen.read()
        if connected.get("ok") != load["sockets"]:
            raise RuntimeError(f"connects failed: {connected.get('errors')}")
        meters = {k: CpuMeter(p, pg_root) for k, p in pids.items()}
        steps: list[dict[str, Any]] = []

        def show(msg: dict[str, Any]) -> None:
            laps = {k: m.lap() for k, m in meters.items()}
            lap = laps["A"]
            msg["server_cpu_pct"] = {k: v["server_pct"] for k, v in laps.items()}
            msg["cpu"] = lap
            steps.append(msg)
            lat = msg["latency_ms"]
            cpu = ", ".join(f"{k} {fmt(v, 0)}%" for k, v in msg["server_cpu_pct"].items())
            log(f"  {bus} {topology}: {msg['events_per_s']:g} events/s -> {msg['achieved_events_per_s']:.0f}/s, "
                f"p50 {fmt(lat['p50'])} p99 {fmt(lat['p99'])} ms, lost {msg['lost']}, http {msg['http_status']}; "
                f"cpu: {cpu}, postgres {fmt(lap['postgres_pct'], 0)}%, loadgen {fmt(msg['loadgen_cpu_pct'], 0)}%, "
                f"cores {fmt(lap.get('core0_busy_pct'), 0)}/{fmt(lap.get('core1_busy_pct'), 0)}%"
                f"{'' if msg['pass'] else '  (FAIL)'}{'  (retried)' if msg.get('retried') else ''}")

        gen.until_final(show)
        lap = meter.lap()
    finally:
        if gen is not None:
            gen.close()
        for s in servers:
            s.stop()
    return {"connect": connected, "steps": steps, "ladder": load["steps"], "cpu": lap}


def figures(r: dict[str, Any], refs: list[float]) -> dict[str, float | None]:
    """Max events/s: the highest step that passed, with every step below it passing."""
    steps = [s for s in r["steps"] if not s.get("retried")]
    best: dict[str, Any] | None = None
    fail: dict[str, Any] | None = None
    for s in steps:
        if not s["pass"]:
            fail = s
            break
        best = s
    out: dict[str, float | None] = {
        # the generator's core was near saturation at the step that failed: the max may be its
        "generator_bound": 1.0 if fail is not None and ((fail.get("loadgen_cpu_pct") or 0) >= GENERATOR_BOUND_PCT
                                                       or (fail["cpu"].get("core1_busy_pct") or 0) >= 95) else 0.0,
        "max_events_per_s": best["achieved_events_per_s"] if best else 0.0,
        "p50_at_max": best["latency_ms"]["p50"] if best else None,
        "p99_at_max": best["latency_ms"]["p99"] if best else None,
        # every rate of the ladder passed: the ladder, not the bus, set the max
        "top_passed": 1.0 if best is not None and best is steps[-1] and len(steps) == len(r["ladder"]) else 0.0,
    }
    for ref in refs:
        at = next((s for s in steps if s["events_per_s"] == ref), None)
        out[f"p50_at_{ref:g}"] = at["latency_ms"]["p50"] if at else None
        out[f"p99_at_{ref:g}"] = at["latency_ms"]["p99"] if at else None
    return out


def summarize(runs: list[dict[str, Any]], buses: list[str], refs: list[float]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for bus in buses:
        for topology in TOPOLOGIES:
            got = [figures(r, refs) for r in runs if r["bus"] == bus and r["topology"] == topology
                   and "error" not in r and "discarded" not in r]
            keys = got[0].keys() if got else []
            out[f"{bus}/{topology}"] = {k: median_or_none([g[k] for g in got]) for k in keys} | {"rounds": len(got)}
    return out


def _cell(v: float | None) -> str:
    return "—" if v is None else f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.1f}"


def render(summary: dict[str, Any], refs: list[float], rounds: int) -> str:
    """The added latency is compared at the same rates (``refs``); at max the rates differ."""
    rows = [("max events/s (p99 ≤ 200 ms, none lost) ↑", "max_events_per_s", "ratio")]
    for ref in refs:
        rows += [(f"p50 ms at {ref:g} events/s ↓", f"p50_at_{ref:g}", "added"),
                 (f"p99 ms at {ref:g} events/s ↓", f"p99_at_{ref:g}", "added")]
    rows += [("p50 ms at max ↓", "p50_at_max", ""), ("p99 ms at max ↓", "p99_at_max", "")]
    lines = ["| bus | metric | single process | A → bus → B | cross ÷ single, or added |", "|---|---|---:|---:|---:|"]
    for bus in dict.fromkeys(k.split("/")[0] for k in summary):
        one, two = summary.get(f"{bus}/single", {}), summary.get(f"{bus}/cross", {})
        for label, key, how in rows:
            a, b = one.get(key), two.get(key)
            diff = "—" if a is None or b is None or not how else f"{b / a:.2f}×" if how == "ratio" and a \
                else f"{b - a:+.1f} ms" if how == "added" else "—"
            lines.append(f"| {bus} | {label} | {_cell(a)} | {_cell(b)} | {diff} |")
        if one.get("generator_bound") or two.get("generator_bound"):
            lines.append(f"| {bus} | (the load generator's core was saturated where a ladder failed: "
                         "that max may be the generator's) | | | |")
        if one.get("top_passed") or two.get("top_passed"):
            lines.append(f"| {bus} | (the top of the ladder passed: max is a floor) | | | |")
        if min(one.get("rounds", 0), two.get("rounds", 0)) < rounds:
            lines.append(f"| {bus} | (some rounds failed: see the JSON) | | | |")
    return "\n".join(lines)
