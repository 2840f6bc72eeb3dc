"""Benchmark: orgcast against node-seed side by side, and orgcast's bus.

    .venv/bin/python bench/run.py              # every scenario, 3 rounds (make bench)
    .venv/bin/python bench/run.py --quick      # small sizes, 1 round: a check that it all works
    .venv/bin/python bench/run.py --scenarios fanout5k --only orgcast
    .venv/bin/python bench/run.py bus          # the bus: Postgres and Redis, one process or two
    .venv/bin/python bench/run.py storm        # issue 8: 5,000 sockets of 50 tokens at once, then a reload
    .venv/bin/python bench/run.py recovery     # issue 9: fan-out with ORGCAST_RECOVERY on and off

One throwaway Postgres holds the tokens and memberships (loadgen-c's
convention: user ``u<n>``, token ``tok`` + n zero-padded to 37 digits). Each
scenario of each round starts a fresh server pinned to core 0: orgcast as
in production (``gunicorn -c gunicorn.conf.py wsgi:app``, one worker), or
node-seed under node. The load generator and Postgres are pinned to core 1.
Rounds alternate the order of the servers (orgcast, node-seed, then
node-seed, orgcast, ...); the table gives medians and orgcast ÷ node-seed.

- fan-out scenarios (fanout5k, fanout50x100, fanout15k): loadgen-c, the C
  client of shared/tools/loadgen-c, built at run time in a temporary folder;
- the sockets scenario: bench/loadgen.js connects clients (timed), then
  more, and holds them idle while the server's RSS and CPU are read.

Results go to bench/results/<date>[-n].json. Every process started here is
stopped by its PID (then its process group) in a ``finally`` block, also
on Ctrl-C and SIGTERM; the temporary folders are removed; all traffic goes
to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from common import DISTURBED_PCT, TempDir, build_loadgen_c, fmt, log, pin_tree, print_footer, run_repeating, wait_quiet
from report import SERVERS, TABLE_NOTES, aggregate, render_table, results_path, save
from scenarios import FANOUTS, SCENARIOS, WARMUP_USERS, Context, run_scenario, sizes_for, table_rows
from servers import NodeSeed, Orgcast, Server, ThrowawayPostgres, fill_database, prepare_node_seed, versions


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", default="compare", choices=("compare", "bus", "storm", "recovery"),
                   help="compare: orgcast against node-seed (default); bus: orgcast's bus, one process or two; "
                        "storm: a reconnect storm and a reload (issue 8); recovery: fan-out with "
                        "ORGCAST_RECOVERY on and off (issue 9)")
    p.add_argument("--quick", action="store_true", help="small sizes, one round, two fixed fan-out steps")
    p.add_argument("--rounds", type=int, default=None, help="rounds per server (default 3; quick 1)")
    p.add_argument("--only", choices=SERVERS, help="run one server only (no ratios)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help=f"comma-separated, of {', '.join(SCENARIOS)} (default all)")
    p.add_argument("--step-s", type=float, default=None, help="publishing time per fan-out step (default 5; quick 2)")
    p.add_argument("--factor", type=float, default=1.5, help="fan-out ladder: rate factor between steps")
    p.add_argument("--idle-seconds", type=float, default=None,
                   help="idle CPU window (default 35, longer than the 25 s ping interval; quick 5)")
    p.add_argument("--concurrency", type=int, default=100, help="connects in flight")
    p.add_argument("--retries", type=int, default=None,
                   help="repeat a run disturbed by other work on the machine, at most this many times in all "
                        "(default 2; quick 0)")
    p.add_argument("--wait-quiet", type=float, default=10.0,
                   help="before each run, wait up to this many seconds for other work on the machine to stop")
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    p.add_argument("--output", type=Path, default=None, help="results JSON (default bench/results/<date>[-n].json)")
    p.add_argument("--commit", default=None,
                   help="run orgcast from this commit's files (git archive into a temporary folder), not from "
                        "the working tree: the figures stay those of one commit while app/ is being edited")
    p.add_argument("--orgcast-env", action="append", default=[], metavar="NAME=VALUE",
                   help="a setting for orgcast (repeatable), e.g. ORGCAST_PRESENCE_EVENTS=true")
    bus = p.add_argument_group("bus (bench/run.py bus)")
    bus.add_argument("--buses", default=None,
                     help="comma-separated, of postgres, redis (default: both for bus, postgres for recovery)")
    bus.add_argument("--bus-sockets", type=int, default=None, help="sockets on the receiving server (default 500)")
    bus.add_argument("--bus-rooms", type=int, default=None,
                     help="rooms they are spread over (default 50: 10 sockets per event)")
    bus.add_argument("--bus-rates", default=None, help="ladder of events/s, comma-separated")
    bus.add_argument("--bus-ref-rates", default=None,
                     help="events/s (among the rates) at which single and cross-process latency are compared "
                          "(default 100,400)")
    storm = p.add_argument_group("storm (bench/run.py storm)")
    storm.add_argument("--storm-users", type=int, default=None, help="users, one token each (default 50; quick 10)")
    storm.add_argument("--storm-sockets-per-user", type=int, default=100, help="sockets per token (default 100)")
    storm.add_argument("--storm-inflight", type=int, default=1000,
                       help="connects in flight during the storm (default 1000; the sockets' number: all at once)")
    storm.add_argument("--storm-workers", default="2,1", help="WEB_CONCURRENCY values for orgcast (default 2,1)")
    storm.add_argument("--storm-variants", default="default,ttl0,node-seed",
                       help="of default (ORGCAST_AUTH_CACHE_TTL unset), ttl0 (=0: coalescing only), node-seed, "
                            "redis (default TTL with REDIS_URL: the history and kept sessions in Redis)")
    storm.add_argument("--no-restart", action="store_true", help="no kill -HUP reload after the storm")
    args = p.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 3)
    if any("=" not in e for e in args.orgcast_env):
        p.error("--orgcast-env takes NAME=VALUE")
    args.orgcast_env = dict(e.split("=", 1) for e in args.orgcast_env)
    if args.retries is None:
        args.retries = 0 if args.quick else 2
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenario(s) {', '.join(sorted(unknown))}; choose from {', '.join(SCENARIOS)}")
    args.buses = [s.strip() for s in (args.buses or ("postgres" if args.command == "recovery" else
                                                     "postgres,redis")).split(",") if s.strip()]
    if set(args.buses) - {"postgres", "redis"}:
        p.error("--buses takes postgres and/or redis")
    try:
        args.storm_workers = [int(w) for w in args.storm_workers.split(",") if w.strip()]
    except ValueError:
        p.error("--storm-workers takes numbers, e.g. 2,1")
    args.storm_variants = [s.strip() for s in args.storm_variants.split(",") if s.strip()]
    if set(args.storm_variants) - {"default", "ttl0", "node-seed", "redis"} or not args.storm_variants:
        p.error("--storm-variants takes default, ttl0, node-seed and/or redis")
    if any(w < 1 for w in args.storm_workers) or args.storm_sockets_per_user < 1 or args.storm_inflight < 1:
        p.error("--storm-workers, --storm-sockets-per-user and --storm-inflight must be at least 1")
    for name in ("rounds", "concurrency"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.factor <= 1.05:
        p.error("--factor must be above 1.05")
    return args


def prepare_process(pin: bool) -> tuple[int | None, int | None]:
    """Ctrl-C and SIGTERM unwind through the finally blocks; the open-file limit
    is raised to the hard one (children inherit it); the runner itself sits on
    the load generator's core. Returns (server core, load generator core)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if not pin:
        return None, None
    os.sched_setaffinity(0, {1})
    return 0, 1


def one_line(error: str) -> str:
    """An error's first line and, for a server that died, the last line of its log (the JSON has all)."""
    lines = [ln for ln in error.splitlines() if ln.strip()]
    return lines[0] + (f" … {lines[-1]}" if len(lines) > 1 else "") if lines else error


def missing_tools(names: list[str]) -> list[str]:
    return [t for t in names if shutil.which(t) is None]


def compare(args: argparse.Namespace, argv: list[str]) -> int:
    missing = missing_tools(["node", "npm", "gcc", "make", *([] if args.no_pin else ["taskset"])])
    if missing:
        print(f"bench: not found: {', '.join(missing)} (make bench installs them)", file=sys.stderr)
        return 2
    sizes = sizes_for(args)
    servers = [args.only] if args.only else list(SERVERS)
    scenarios = [s for s in SCENARIOS if s in args.scenarios]
    pin = (os.cpu_count() or 1) >= 2 and not args.no_pin
    server_core, lg_core = prepare_process(pin)
    t0 = time.monotonic()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    tmp = TempDir("orgcast-bench-")
    pg: ThrowawayPostgres | None = None
    runs: list[dict[str, Any]] = []
    try:
        loadgen_c = build_loadgen_c(tmp.path) if set(scenarios) & set(FANOUTS) else Path("/nonexistent")
        seed = prepare_node_seed(tmp.path) if "node-seed" in servers else None
        environment = versions(seed)
        pg = ThrowawayPostgres()
        pg.start()
        assert pg.proc is not None
        if lg_core is not None:
            pin_tree(pg.proc.pid, lg_core)
        users = sizes.max_sockets + WARMUP_USERS
        log(f"postgres on port {pg.port}; {users} users with their tokens")
        fill_database(pg, users, [1, *(f.rooms for f in sizes.fanouts)])
        ctx = Context(args, sizes, tmp.path, loadgen_c, pg.proc.pid, server_core, lg_core)
        retries_left = args.retries
        for i in range(args.rounds):
            order = servers if i % 2 == 0 else servers[::-1]
            for scenario in scenarios:
                for name in order:
                    retries_left = run_repeating(f"{name} {scenario}", runs, retries_left, run_one, name, scenario,
                                                 ctx, i + 1, pg.dsn)
    finally:
        if pg is not None:
            pg.stop()
        tmp.remove()

    rows = table_rows(sizes, scenarios)
    agg = aggregate(runs, rows, sizes)
    table = render_table(agg, args.rounds, servers)
    elapsed = time.monotonic() - t0
    kept = [r for r in runs if "discarded" not in r]
    noisy = [f"{r['server']} {r['scenario']} round {r['round']} (~{r['cpu']['other_work_pct']:.0f}%)"
             for r in kept if "error" not in r and (r["cpu"].get("other_work_pct") or 0) > DISTURBED_PCT]
    failed = [f"{r['server']} {r['scenario']} round {r['round']}: {one_line(r['error'])}" for r in runs if "error" in r]
    print()
    print(f"orgcast vs node-seed: {args.rounds} round(s), medians"
          + (" (--quick sizes)" if args.quick else "") + f"; scenarios {', '.join(scenarios)}")
    print("one gunicorn worker / one node process on core 0; load generator and Postgres on core 1"
          if pin else "processes not pinned (--no-pin)")
    print()
    print(table)
    print()
    print(TABLE_NOTES)
    print_footer(elapsed, runs, kept, noisy, failed)
    results = {
        "started": started, "elapsed_s": round(elapsed, 1),
        "command": " ".join(["bench/run.py", *argv]),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "sizes": {"fanouts": [vars(f) for f in sizes.fanouts], "connects": sizes.connects,
                  "idle_total": sizes.idle_total, "idle_seconds": sizes.idle_seconds, "step_s": sizes.step_s},
        "pinning": {"servers": server_core, "loadgen_postgres_runner": lg_core},
        "environment": environment, "medians": agg, "table_markdown": table,
        "disturbed": noisy, "failed": failed, "runs": runs,
    }
    print(f"raw results: {save(results, results_path('quick' if args.quick else '', args.output))}")
    return 1 if failed else 0


def run_one(name: str, scenario: str, ctx: Context, round_no: int, dsn: str) -> dict[str, Any]:
    log(f"round {round_no}/{ctx.args.rounds}: {scenario} on {name}")
    background = wait_quiet(ctx.args.wait_quiet)
    server: Server = (Orgcast(dsn, ctx.workdir, ctx.server_core, env=ctx.args.orgcast_env) if name == "orgcast"
                      else NodeSeed(dsn, ctx.workdir, ctx.server_core))
    t = time.monotonic()
    try:
        r = run_scenario(scenario, server, ctx)
    except (RuntimeError, TimeoutError, OSError, KeyError, ValueError) as exc:
        # Recorded and left out of the medians; the other runs go on.
        log(f"  {name} {scenario}: FAILED: {exc}")
        r = {"error": str(exc)}
    r.update({"server": name, "scenario": scenario, "round": round_no, "seconds": round(time.monotonic() - t, 1),
              "background_before": background})
    if "cpu" in r:
        log(f"  {name} {scenario}: {r['seconds']:.0f}s; other work on the machine "
            f"~{fmt(r['cpu'].get('other_work_pct'), 0)}% of a core (hypervisor steal "
            f"~{fmt(r['cpu'].get('steal_pct'), 0)}%)")
    return r


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    tree: TempDir | None = None
    if args.commit:
        from servers import export_commit

        tree = TempDir("orgcast-bench-tree-")
        sha = export_commit(args.commit, tree.path / "orgcast")
        log(f"orgcast runs from {Orgcast.tree} (git archive of {sha})")
    try:
        return dispatch(args, argv)
    finally:
        if tree is not None:
            tree.remove()


def dispatch(args: argparse.Namespace, argv: list[str]) -> int:
    if args.command == "bus":
        from bus import run_bus_bench

        missing = missing_tools(["node", *([] if args.no_pin else ["taskset"])])
        if missing:
            print(f"bench: not found: {', '.join(missing)}", file=sys.stderr)
            return 2
        pin = (os.cpu_count() or 1) >= 2 and not args.no_pin
        return run_bus_bench(args, argv, *prepare_process(pin))
    if args.command == "storm":
        from storm import run_storm_bench

        missing = missing_tools(["node", *(["npm"] if "node-seed" in args.storm_variants else []),
                                 *([] if args.no_pin else ["taskset"])])
        if missing:
            print(f"bench: not found: {', '.join(missing)}", file=sys.stderr)
            return 2
        pin = (os.cpu_count() or 1) >= 2 and not args.no_pin
        return run_storm_bench(args, argv, *prepare_process(pin))
    if args.command == "recovery":
        from recovery import run_recovery_bench

        missing = missing_tools(["node", "gcc", "make", *([] if args.no_pin else ["taskset"])])
        if missing:
            print(f"bench: not found: {', '.join(missing)}", file=sys.stderr)
            return 2
        pin = (os.cpu_count() or 1) >= 2 and not args.no_pin
        return run_recovery_bench(args, argv, *prepare_process(pin))
    return compare(args, argv)


if __name__ == "__main__":
    sys.exit(main())
