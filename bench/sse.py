"""What an idle Server-Sent Events stream costs beside an idle Socket.IO socket (issue 23).

One gunicorn worker of orgcast (``gunicorn -c gunicorn.conf.py wsgi:app``,
the README's defaults, pinned to core 0), a throwaway Postgres with the
users of bench/run.py, and bench/loadgen.js on core 1 opening ``--connects``
clients, then more up to ``--total``, 100 in flight, all idle — once as
Socket.IO sockets over WebSocket (``40{token, organizationId}``), once as
event streams (``GET /api/v1/stream``, the token in a Bearer header), each
on a fresh server, alternating which goes first over ``--rounds`` rounds.
The figures are bench/run.py's ``sockets`` scenario's: the worker's RSS
before, after each stage and after ``--idle-seconds`` of heartbeats, the
connect rate and the worker's idle CPU.

    .venv/bin/python bench/sse.py                      # 1,000 then 5,000, 3 rounds
    .venv/bin/python bench/sse.py --rounds 1 --total 2000
    .venv/bin/python bench/sse.py --rounds 1 --commit c3b2ee6   # an earlier commit's server

The table goes to stdout, progress to stderr, everything to
``bench/results/<date>-sse.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from common import TempDir, fmt, log, pin_tree
from report import results_path, save
from run import prepare_process
from scenarios import WARMUP_USERS, Context, Sizes, run_sockets, sockets_metrics
from servers import Orgcast, ThrowawayPostgres, export_commit, fill_database, versions

TRANSPORTS = ("websocket", "sse")
ROWS = (("connects_per_s", "connects/s ({c} clients, 100 in flight)"),
        ("auth_p99", "connect p99 ms"),
        ("connect_errors", "connect errors and dropped"),
        ("kib_per_socket_1", "idle memory KiB each at {c}"),
        ("kib_per_socket_2", "idle memory KiB each at {t}"),
        ("idle_cpu_pct", "idle CPU % of a core, {t} (pings / heartbeats)"),
        ("idle_rss_mib", "worker RSS MiB with {t}"))


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connects", type=int, default=1000)
    p.add_argument("--total", type=int, default=5000)
    p.add_argument("--idle-seconds", type=float, default=30.0, help="longer than the 25 s ping interval")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=100)
    p.add_argument("--output", type=Path)
    p.add_argument("--commit", help="measure this commit's server files (git archive), not the working tree")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    server_core, lg_core = prepare_process(True)
    sizes = Sizes((), connects=args.connects, idle_total=args.total, idle_seconds=args.idle_seconds, step_s=0.0,
                  quick=False)
    t0 = time.monotonic()
    tmp = TempDir("orgcast-bench-sse-")
    if args.commit:
        log(f"orgcast runs from {export_commit(args.commit, tmp.path / 'tree')} (git archive)")
    pg = ThrowawayPostgres()
    runs: list[dict[str, Any]] = []
    try:
        pg.start()
        assert pg.proc is not None
        if lg_core is not None:
            pin_tree(pg.proc.pid, lg_core)
        fill_database(pg, args.total + WARMUP_USERS, [1])
        ctx = Context(args, sizes, tmp.path, Path("/nonexistent"), pg.proc.pid, server_core, lg_core)
        for round_no in range(1, args.rounds + 1):
            order = TRANSPORTS if round_no % 2 else TRANSPORTS[::-1]
            for transport in order:
                log(f"round {round_no}/{args.rounds}: {transport}")
                server = Orgcast(pg.dsn, tmp.path, server_core, label=f"orgcast-{transport}")
                server.start()
                try:
                    result = run_sockets(server, server.measured_pid(), ctx, transport)
                finally:
                    server.stop()
                runs.append({"transport": transport, "round": round_no, **result,
                             "metrics": sockets_metrics(result)})
    finally:
        pg.stop()
        tmp.remove()

    medians = {t: {key: statistics.median(v for r in runs if r["transport"] == t
                                          if (v := r["metrics"][key]) is not None)
                   for key, _ in ROWS} for t in TRANSPORTS}
    c, total = f"{args.connects:,}", f"{args.total:,}"
    lines = ["| | Socket.IO (WebSocket) | SSE | SSE ÷ Socket.IO |", "|---|---|---|---|"]
    for key, label in ROWS:
        ws, sse = medians["websocket"][key], medians["sse"][key]
        lines.append(f"| {label.format(c=c, t=total)} | {fmt(ws)} | {fmt(sse)} | "
                     f"{fmt(sse / ws, 2) if ws else '—'} |")
    table = "\n".join(lines)
    print(f"\nidle Socket.IO sockets and SSE streams on one worker, medians of {args.rounds} round(s)\n")
    print(table)
    results = {"kind": "sse", "command": " ".join(["bench/sse.py", *argv]), "elapsed_s": round(time.monotonic() - t0),
               "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "environment": {**versions(None), "exported_commit": Orgcast.exported_commit},
               "medians": medians, "table_markdown": table, "runs": runs}
    print(f"raw results: {save(results, results_path('sse', args.output))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
