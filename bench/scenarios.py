"""The side-by-side scenarios: what each one runs, and the figures it yields.

Every scenario gets a fresh server process. The fan-out scenarios are driven
by loadgen-c (its ladder: the rate rises by ``factor`` from one event/s per
room until the server no longer keeps up, then the boundary of the p99
limit is bisected); the connect and idle scenario by bench/loadgen.js.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import (
    API_KEY,
    HOST,
    CpuMeter,
    JsLoadGen,
    cpu_seconds,
    fmt,
    log,
    rss_kib,
    run_loadgen_c,
    wait_idle,
)
from servers import Orgcast, Server


@dataclass(frozen=True)
class Fanout:
    """One room or several, ``sockets`` in all, evenly spread (loadgen-c's convention)."""

    name: str
    sockets: int
    rooms: int
    p99_limit_ms: float

    @property
    def label(self) -> str:
        per = self.sockets // self.rooms
        return f"{self.rooms} room{'s' if self.rooms > 1 else ''} × {per:,}"


@dataclass(frozen=True)
class Sizes:
    fanouts: tuple[Fanout, ...]
    connects: int        # clients of the connect test; they stay, idle
    idle_total: int      # idle sockets at the end of the sockets scenario
    idle_seconds: float  # the idle CPU window
    step_s: float        # publishing time per fan-out step
    quick: bool

    @property
    def max_sockets(self) -> int:
        return max([self.idle_total, *(f.sockets for f in self.fanouts)])

    def fanout(self, name: str) -> Fanout:
        return next(f for f in self.fanouts if f.name == name)


FANOUTS = ("fanout5k", "fanout50x100", "fanout15k")
SCENARIOS = (*FANOUTS, "sockets")
#: warm-up connections before "RSS before" (users above the scenarios' range: no auth-cache
#: hit later); more than the 100 in flight, so the transient memory of a burst of handshakes
#: is not charged to the sockets measured
WARMUP_USERS = 200


def sizes_for(args: argparse.Namespace) -> Sizes:
    if args.quick:
        fanouts = (Fanout("fanout5k", 1000, 1, 200.0), Fanout("fanout50x100", 1000, 10, 200.0),
                   Fanout("fanout15k", 3000, 1, 500.0))
        return Sizes(fanouts, connects=1000, idle_total=3000, idle_seconds=args.idle_seconds or 5.0,
                     step_s=args.step_s or 2.0, quick=True)
    fanouts = (Fanout("fanout5k", 5000, 1, 200.0), Fanout("fanout50x100", 5000, 50, 200.0),
               Fanout("fanout15k", 15000, 1, 500.0))
    return Sizes(fanouts, connects=5000, idle_total=15000, idle_seconds=args.idle_seconds or 35.0,
                 step_s=args.step_s or 5.0, quick=False)


@dataclass
class Context:
    args: argparse.Namespace
    sizes: Sizes
    workdir: Path
    loadgen_c: Path
    pg_root: int
    server_core: int | None
    lg_core: int | None


def run_scenario(name: str, server: Server, ctx: Context) -> dict[str, Any]:
    server.start()
    try:
        pid = server.measured_pid()
        meter = CpuMeter(pid, ctx.pg_root)
        if name in FANOUTS:
            result = run_fanout(server, pid, ctx.sizes.fanout(name), ctx)
        else:
            result = run_sockets(server, pid, ctx)
        result["cpu"] = meter.lap()
    finally:
        server.stop()
    result["server_stop_s"] = server.stop_seconds
    return result


# --- fan-out (loadgen-c) ------------------------------------------------------------


def run_fanout(server: Server, pid: int, spec: Fanout, ctx: Context) -> dict[str, Any]:
    options: dict[str, Any] = {
        "url": f"http://{HOST}:{server.port}", "api-key": API_KEY, "server-pid": pid, "pg-pid": ctx.pg_root,
        "n": spec.sockets, "orgs": spec.rooms, "p99-limit-ms": spec.p99_limit_ms, "step-s": ctx.sizes.step_s,
        "server-cpu": ctx.server_core if ctx.server_core is not None else 0,
        "loadgen-cpu": ctx.lg_core if ctx.lg_core is not None else 1,
        "max-s": 600, "label": f"{server.name} {spec.name}",
    }
    if ctx.sizes.quick:
        # Two fixed steps, one event/s per room and 20: quick, and far from any limit.
        options.update({"rates": f"{spec.sockets},{spec.sockets * 20}", "warmup-s": 1})
    else:
        options.update({"start": spec.sockets, "factor": ctx.args.factor, "refine": 2})

    def show(line: str) -> None:
        text = line.split("] ", 1)[-1]
        if text.startswith(("step", "fanout: ", "connect phase", "time budget")):
            log(f"  {server.label} {spec.name}: {text}")

    out = run_loadgen_c(ctx.loadgen_c, options, ctx.lg_core, ctx.workdir / f"loadgen-c-{server.label}.log",
                        show, timeout=660)
    if out.get("connect_failed"):
        # loadgen-c goes on with the sockets it has: its figures would be for a smaller room.
        raise RuntimeError(f"{out['connect_failed']} of {spec.sockets} sockets did not connect "
                           f"(see loadgen-c's log); the fan-out figures would be for {out.get('connected')}")
    return {"loadgen_c": out}


def fanout_metrics(spec: Fanout, r: dict[str, Any]) -> tuple[dict[str, float | None], dict[str, str]]:
    """The figures of one fan-out run, and marks on some of them (see render_table)."""
    out = r["loadgen_c"]
    best = out.get("max_sustainable") or {}
    lat = best.get("latency_ms") or {}
    per_event = float(out.get("recipients_per_event") or spec.sockets / spec.rooms)
    delivered = best.get("delivered_per_s")
    m: dict[str, float | None] = {
        "max": float(delivered) if delivered is not None else 0.0,
        "p50_at_max": lat.get("p50"),
        "p99_at_max": lat.get("p99"),
        "publishes_at_max": float(delivered) / per_event if delivered else None,
        "cpu_us_at_max": (float(best["server_cpu_pct"]) / 100 / float(delivered) * 1e6
                          if delivered and best.get("server_cpu_pct") is not None else None),
    }
    lowest = out.get("lowest_step_latency_ms") or {}
    m["p50_lowest"], m["p99_lowest"] = lowest.get("p50"), lowest.get("p99")
    marks: dict[str, str] = {}
    steps = out.get("steps") or []
    if steps and out.get("first_fail") is None and all(s.get("pass") for s in steps):
        marks["max"] = "≥"  # every step passed: the ladder, not the server, ended it
    fail = out.get("first_fail")
    if fail is not None:
        failing = [s for s in steps if s.get("target_deliveries_per_s") == fail.get("target_deliveries_per_s")]
        if any((s.get("cpu") or {}).get("loadgen_saturated") for s in failing):
            marks["max"] = "g"  # the generator's core was saturated where the server failed
    return m, marks


# --- connects, memory, idle (loadgen.js) -----------------------------------------------


def run_sockets(server: Server, pid: int, ctx: Context, transport: str = "websocket") -> dict[str, Any]:
    """Connect ``connects`` clients (timed), then more up to ``idle_total``, all idle.

    RSS of the server process before, after the first stage and after the
    second; then its CPU over ``idle_seconds`` with only Engine.IO pings (or,
    with ``transport="sse"``, event streams and their heartbeats; bench/sse.py).
    """
    sizes, core = ctx.sizes, ctx.lg_core
    result: dict[str, Any] = {}
    base = {"port": server.port, "orgs": 1, "concurrency": ctx.args.concurrency, "transport": transport}

    # Warm-up: a few connections of users outside the measured range, so
    # first-use allocations are not charged to the measurements.
    warm = JsLoadGen({**base, "mode": "sockets", "stages": [WARMUP_USERS], "userOffset": sizes.max_sockets},
                     core, 60)
    try:
        first = warm.read()
        warm.send("stop")
        warm.until_final()
    finally:
        warm.close()
    if first.get("ok") != WARMUP_USERS:
        raise RuntimeError(f"warm-up connects failed: {first.get('errors')}")
    wait_idle(pid)
    time.sleep(0.5)
    rss0 = rss_kib(pid)

    stages = [sizes.connects, sizes.idle_total - sizes.connects]
    gen = JsLoadGen({**base, "mode": "sockets", "stages": stages, "userOffset": 0}, core,
                    120 + sizes.idle_seconds + sizes.idle_total / 200)
    try:
        meter = CpuMeter(pid, ctx.pg_root)
        connect = gen.read()
        lap = meter.lap()
        connect["cpu"] = lap
        result["connect"] = connect
        log(f"  {server.label} sockets: {connect['ok']}/{connect['attempted']} connects, "
            f"{fmt(connect['connects_per_s'], 0)}/s, auth p50 {fmt(connect['auth_ms']['p50'])} "
            f"p99 {fmt(connect['auth_ms']['p99'])} ms, errors {connect['errors']}; cpu: server "
            f"{fmt(lap['server_pct'], 0)}%, postgres {fmt(lap['postgres_pct'], 0)}%, "
            f"loadgen {fmt(connect['loadgen_cpu_pct'], 0)}%, core1 {fmt(lap.get('core1_busy_pct'), 0)}%")
        wait_idle(pid)
        time.sleep(1.0)
        rss1 = rss_kib(pid)
        gen.send("next")
        more = gen.read()
        result["more"] = more
        wait_idle(pid)
        time.sleep(1.0)
        rss2 = rss_kib(pid)
        # The idle window: pings only (one per socket every ping interval, 25 s).
        master = server.proc.pid if isinstance(server, Orgcast) and server.proc else None
        c0, m0, t0 = cpu_seconds(pid), cpu_seconds(master) if master else 0.0, time.monotonic()
        meter = CpuMeter(pid, ctx.pg_root)
        time.sleep(sizes.idle_seconds)
        c1, m1, t1 = cpu_seconds(pid), cpu_seconds(master) if master else 0.0, time.monotonic()
        idle_lap = meter.lap()
        rss3 = rss_kib(pid)
        gen.send("stop")
        final = gen.until_final()
    finally:
        gen.close()
    n1, n2 = connect["ok"], connect["ok"] + more["ok"]
    result.update({
        "rss_kib": {"before": rss0, "after_stage1": rss1, "after_stage2": rss2, "after_idle": rss3},
        "sockets": {"stage1": n1, "stage2": n2, "open_at_end": final.get("open_at_end"),
                    "dropped": final.get("dropped"), "pings_answered": final.get("pings_answered")},
        "idle": {"seconds": round(t1 - t0, 2), "server_pct": 100 * (c1 - c0) / (t1 - t0),
                 "gunicorn_master_pct": 100 * (m1 - m0) / (t1 - t0) if master else None, "cpu": idle_lap},
    })
    log(f"  {server.label} sockets: RSS {rss0} -> {rss1} KiB ({n1} sockets) -> {rss2} KiB ({n2}); "
        f"idle {result['idle']['server_pct']:.2f}% of a core over {t1 - t0:.0f}s, "
        f"{final.get('pings_answered')} pings answered, {final.get('dropped')} dropped")
    return result


def sockets_metrics(r: dict[str, Any]) -> dict[str, float | None]:
    connect, more, rss, socks = r["connect"], r["more"], r["rss_kib"], r["sockets"]
    lap = connect["cpu"]
    n1, n2 = socks["stage1"], socks["stage2"]
    errors = sum(connect["errors"].values()) + sum(more["errors"].values()) + (socks["dropped"] or 0)
    return {
        "connects_per_s": connect["connects_per_s"],
        "auth_p50": connect["auth_ms"]["p50"],
        "auth_p99": connect["auth_ms"]["p99"],
        "connect_errors": float(errors),
        "cpu_us_per_connect": (float(lap["server_pct"]) / 100 * float(lap["wall_s"]) / n1 * 1e6
                               if n1 and lap.get("server_pct") is not None else None),
        "kib_per_socket_1": (rss["after_stage1"] - rss["before"]) / n1 if n1 else None,
        "kib_per_socket_2": (rss["after_stage2"] - rss["before"]) / n2 if n2 else None,
        "idle_cpu_pct": r["idle"]["server_pct"],
        "idle_rss_mib": rss["after_idle"] / 1024,
    }


# --- the rows of the table ----------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    scenario: str
    key: str
    label: str
    better: str  # "higher" or "lower"


def table_rows(sizes: Sizes, scenarios: list[str]) -> list[Row]:
    rows: list[Row] = []
    for spec in sizes.fanouts:
        if spec.name not in scenarios:
            continue
        lbl = f"fan-out {spec.label}"
        rows.append(Row(spec.name, "max", f"{lbl}: max deliveries/s (p99 ≤ {spec.p99_limit_ms:.0f} ms, none lost)",
                        "higher"))
        if spec.rooms > 1:
            rows.append(Row(spec.name, "publishes_at_max", f"{lbl}: publishes/s at that rate", "higher"))
        rows += [Row(spec.name, "p50_at_max", f"{lbl}: p50 ms at that rate", "lower"),
                 Row(spec.name, "p99_at_max", f"{lbl}: p99 ms at that rate", "lower")]
        if spec.name == "fanout5k":
            rows += [Row(spec.name, "p50_lowest", f"{lbl}: p50 ms at 1 event/s", "lower"),
                     Row(spec.name, "p99_lowest", f"{lbl}: p99 ms at 1 event/s", "lower"),
                     Row(spec.name, "cpu_us_at_max", f"{lbl}: server CPU µs per delivery at max", "lower")]
    if "sockets" in scenarios:
        c, t = f"{sizes.connects:,}", f"{sizes.idle_total:,}"
        rows += [
            Row("sockets", "connects_per_s", f"authorized connects/s ({c} clients, 100 in flight)", "higher"),
            Row("sockets", "auth_p50", "auth p50 ms (websocket open → CONNECT ack)", "lower"),
            Row("sockets", "auth_p99", "auth p99 ms", "lower"),
            Row("sockets", "connect_errors", "connect errors and dropped sockets", "lower"),
            Row("sockets", "cpu_us_per_connect", "server CPU µs per connect", "lower"),
            Row("sockets", "kib_per_socket_1", f"idle memory KiB per socket at {c}", "lower"),
            Row("sockets", "kib_per_socket_2", f"idle memory KiB per socket at {t}", "lower"),
            Row("sockets", "idle_cpu_pct",
                f"idle CPU % of a core, {t} sockets (pings only, {sizes.idle_seconds:.0f} s)", "lower"),
            Row("sockets", "idle_rss_mib", f"server RSS MiB with {t} idle sockets", "lower"),
        ]
    return rows


def metrics_of(name: str, r: dict[str, Any], sizes: Sizes) -> tuple[dict[str, float | None], dict[str, str]]:
    if name in FANOUTS:
        return fanout_metrics(sizes.fanout(name), r)
    return sockets_metrics(r), {}
