"""What the periodic re-check of connected sockets' rights costs the database (``bench/revalidate.py``).

``app/realtime/revalidate.py``'s ``Revalidator`` asks, every
``ORGCAST_REVALIDATE_INTERVAL`` seconds, about the distinct tokens and
(organization, user) memberships of the sockets a worker holds, 1,000 to a
statement (``AuthStore.tokens()`` / ``.members()`` through
``AuthChecker.tokens_now()`` / ``.members_now()``). This measures one such
round for N idle sockets of U users, against a throwaway Postgres:

- the data: users ``ru<i>`` (i = 0 … U − 1), each with the token ``rtok<i>``
  (expires in a day) and a membership of ``rorg<i mod 50>``;
- the sockets: a stand-in for the Socket.IO server with N sessions, socket
  *j* being user *j* mod U's (its token, its one organization), whose
  ``revoke`` and ``token_gone`` only count their calls;
- the real ``Database`` (pool of 2, 10 s timeout), ``AuthStore`` with the
  default SQL of ``app/config.py``, ``AuthChecker`` with no cache, and
  ``Revalidator.round(spread=0)``: the batches back to back, not spread over
  the interval as in production.

One round first (a warm-up, not in the medians), then ``--rounds`` rounds
(default 3): statements (``Database.fetch_all`` / ``.fetch_one`` wrapped),
the round's wall time and how much of it was spent waiting for Postgres,
this process's CPU, and Postgres's CPU (utime + stime from /proc/<pid>/stat
of the postmaster and its children, plus what the postmaster reaped; and
apart, the backend of the connection that ran the statements). Then 10
memberships and 10 tokens (of 20 other users) are deleted and one more round
must find exactly those: a ``revoke`` per deleted membership, a
``token_gone`` per socket of a user whose token is gone, and nothing else.

    .venv/bin/python bench/revalidate.py                      # 15,000 sockets of 5,000 users
    .venv/bin/python bench/revalidate.py --users 15000        # one socket per user

The table goes to stdout, progress to stderr, everything to
``bench/results/<date>-revalidate.json`` (``-2``, ``-3`` … if taken). The
exit status is 1 when the last round did not find exactly what was deleted.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import BENCH, ROOT, descendants, fmt, log, wait_quiet
from report import results_path, save

sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from throwaway import ThrowawayPostgres  # noqa: E402

from app.auth.checker import AuthChecker  # noqa: E402
from app.auth.store import AuthStore  # noqa: E402
from app.config import DEFAULT_MEMBERSHIP_SQL, DEFAULT_TOKEN_SQL  # noqa: E402
from app.db import Database  # noqa: E402
from app.realtime.revalidate import BATCH, Revalidator  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
#: deleted before the last round: this many memberships, and as many tokens (of other users)
DELETED = 10


# --- Postgres CPU from /proc -----------------------------------------------------------


def _jiffies(pid: int, reaped: bool = False) -> int | None:
    """utime + stime of ``pid`` (and, with ``reaped``, of its children it has waited for)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12]) + ((int(fields[13]) + int(fields[14])) if reaped else 0)


def postgres_jiffies(pg: ThrowawayPostgres) -> dict[int, int]:
    """{pid: jiffies} of the server's processes (runuser, the postmaster, its children)."""
    assert pg.proc is not None
    out = {}
    for pid in descendants(pg.proc.pid):
        # reaped children count too: a backend that exited between two marks is not lost
        j = _jiffies(pid, reaped=True)
        if j is not None:
            out[pid] = j
    return out


def used_jiffies(before: dict[int, int], after: dict[int, int]) -> int:
    """Jiffies used between two marks; processes started meanwhile count from zero."""
    return sum(j - before.get(pid, 0) for pid, j in after.items())


def wait_postgres_idle(pg: ThrowawayPostgres, max_wait: float = 15.0) -> float:
    """Wait until the server used no CPU for a whole second (autovacuum, checkpoints after the load)."""
    start = time.monotonic()
    last = postgres_jiffies(pg)
    while time.monotonic() - start < max_wait:
        time.sleep(1.0)
        cur = postgres_jiffies(pg)
        if used_jiffies(last, cur) == 0:
            break
        last = cur
    return round(time.monotonic() - start, 1)


# --- the database's statements, counted -------------------------------------------------


class CountingDatabase:
    """Wraps ``db.fetch_all`` and ``db.fetch_one`` (instance attributes): statements, rows, time waited."""

    def __init__(self, db: Database) -> None:
        self._fetch_all = db.fetch_all
        self._fetch_one = db.fetch_one
        self._in_one = False
        db.fetch_all = self.fetch_all  # type: ignore[method-assign]
        db.fetch_one = self.fetch_one  # type: ignore[method-assign]
        self.reset()

    def reset(self) -> None:
        self.statements = 0
        self.by_kind: dict[str, int] = {}
        self.via_fetch_one = 0
        self.rows = 0
        self.seconds = 0.0

    @staticmethod
    def _kind(sql: str) -> str:
        if "unnest(%(tokens)s" in sql:
            return "tokens"
        if "unnest(%(orgs)s" in sql:
            return "memberships"
        return "other"

    def fetch_all(self, sql: str, params: Any, timeout: float | None = None,
                  limit: int | None = None) -> list[tuple[Any, ...]]:
        if self._in_one:  # fetch_one's own call of fetch_all: counted there
            return self._fetch_all(sql, params, timeout, limit)
        return self._timed(lambda: self._fetch_all(sql, params, timeout, limit), sql)

    def fetch_one(self, sql: str, params: Any, timeout: float | None = None) -> tuple[Any, ...] | None:
        self.via_fetch_one += 1
        self._in_one = True
        try:
            return self._timed(lambda: self._fetch_one(sql, params, timeout), sql)  # type: ignore[no-any-return]
        finally:
            self._in_one = False

    def _timed(self, call: Callable[[], Any], sql: str) -> Any:
        kind = self._kind(sql)
        self.statements += 1
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
        started = time.perf_counter()
        try:
            result = call()
        finally:
            self.seconds += time.perf_counter() - started
        if isinstance(result, list):
            self.rows += len(result)
        elif result is not None:
            self.rows += 1
        return result


def time_batches(rv: Revalidator, counter: CountingDatabase) -> list[dict[str, Any]]:
    """Wrap the Revalidator's two per-batch steps: each batch's time, and the part not spent waiting for Postgres.

    That part is pure Python: the worker's event loop is held for all of it (only the wait for
    Postgres yields; between batches the production round sleeps ``interval × 0.8 ÷ batches``)."""
    batches: list[dict[str, Any]] = []

    def timed(kind: str, step: Callable[[list[Any]], None]) -> Callable[[list[Any]], None]:
        def run(batch: list[Any]) -> None:
            waited0, t0 = counter.seconds, time.perf_counter()
            try:
                step(batch)
            finally:
                total, waited = time.perf_counter() - t0, counter.seconds - waited0
                batches.append({"kind": kind, "size": len(batch), "seconds": round(total, 4),
                                "database_wait_seconds": round(waited, 4), "python_seconds": round(total - waited, 4)})
        return run

    rv._tokens = timed("tokens", rv._tokens)  # type: ignore[method-assign]
    rv._pairs = timed("memberships", rv._pairs)  # type: ignore[method-assign]
    return batches


# --- the sockets, faked -----------------------------------------------------------------


@dataclass
class Session:
    token: str
    user_id: str
    organizations: list[str]


class FakeSockets:
    """What the Revalidator needs of the Socket.IO server: its sessions, and two calls that are only counted."""

    def __init__(self, sockets: int, users: int, orgs: int) -> None:
        self.sessions: dict[str, Session] = {}
        self.sids_of: dict[str, list[str]] = {}
        for j in range(sockets):
            u = j % users
            sid = f"sid{j}"
            self.sessions[sid] = Session(f"rtok{u}", f"ru{u}", [f"rorg{u % orgs}"])
            self.sids_of.setdefault(f"ru{u}", []).append(sid)
        self.reset()

    def reset(self) -> None:
        self.revoked: list[tuple[str, str, str]] = []
        self.revoked_sockets = 0
        self.gone: list[tuple[str, str]] = []

    def revoke(self, organization_id: str, user_id: str, code: str = "forbidden") -> int:
        self.revoked.append((organization_id, user_id, code))
        n = sum(1 for sid in self.sids_of.get(user_id, []) if organization_id in self.sessions[sid].organizations)
        self.revoked_sockets += n
        return n

    def token_gone(self, sid: str, code: str) -> None:
        self.gone.append((sid, code))


# --- the benchmark ----------------------------------------------------------------------


def load(pg: ThrowawayPostgres, users: int, orgs: int) -> float:
    started = time.monotonic()
    pg.load(ROOT / "scripts" / "schema.sql")
    pg.psql(
        "INSERT INTO oauth_access_tokens (access_token, client_id, user_id, expires, scope) "
        "SELECT 'rtok' || i, 'bench', 'ru' || i, now() + interval '1 day', 'read' "
        f"FROM generate_series(0, {users - 1}) AS i")
    pg.psql(
        "INSERT INTO organization_users (organization_id, user_id) "
        f"SELECT 'rorg' || (i % {orgs}), 'ru' || i FROM generate_series(0, {users - 1}) AS i")
    # statistics now, so that autovacuum does not run during a measured round
    pg.psql("VACUUM ANALYZE oauth_access_tokens")
    pg.psql("VACUUM ANALYZE organization_users")
    return round(time.monotonic() - started, 2)


def one_round(rv: Revalidator, counter: CountingDatabase, sockets: FakeSockets, pg: ThrowawayPostgres,
              backend: int, batches: list[dict[str, Any]]) -> dict[str, Any]:
    counter.reset()
    sockets.reset()
    batches.clear()
    pg0, be0 = postgres_jiffies(pg), _jiffies(backend)
    cpu0, t0 = time.process_time(), time.perf_counter()
    rv.round(spread=0)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    pg1, be1 = postgres_jiffies(pg), _jiffies(backend)
    pg_j = used_jiffies(pg0, pg1)
    be_j = be1 - be0 if be0 is not None and be1 is not None else None
    python_by_kind = {k: round(sum(b["python_seconds"] for b in batches if b["kind"] == k), 4)
                      for k in ("tokens", "memberships")}
    return {
        "statements": counter.statements,
        "statements_by_kind": dict(counter.by_kind),
        "statements_via_fetch_one": counter.via_fetch_one,
        "revalidator_queries": rv.queries,
        "rows_returned": counter.rows,
        "seconds": round(wall, 4),
        "database_wait_seconds": round(counter.seconds, 4),
        "python_cpu_seconds": round(cpu, 4),
        "python_seconds_by_kind": python_by_kind,
        "longest_batch_python_seconds": max((b["python_seconds"] for b in batches), default=None),
        "batches": list(batches),
        "postgres_cpu_jiffies": pg_j,
        "postgres_cpu_ms": round(pg_j * 1000 / TICKS, 1),
        "backend_cpu_jiffies": be_j,
        "backend_cpu_ms": round(be_j * 1000 / TICKS, 1) if be_j is not None else None,
        "revoke_calls": len(sockets.revoked),
        "revoked_sockets": sockets.revoked_sockets,
        "token_gone_calls": len(sockets.gone),
    }


def pick_deleted(sockets: int, users: int, orgs: int) -> tuple[list[tuple[str, str]], list[str]]:
    """10 memberships and 10 tokens, of 20 distinct users that hold sockets, spread over the batches."""
    holders = min(sockets, users)
    step = holders // DELETED
    members = [(f"rorg{(k * step + 1) % orgs}", f"ru{k * step + 1}") for k in range(DELETED)]
    tokens = [f"rtok{k * step + 2}" for k in range(DELETED)]
    return members, tokens


def environment() -> dict[str, Any]:
    def cmd(*c: str) -> str:
        try:
            return subprocess.run(list(c), cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()
        except OSError:
            return ""

    cpu = ""
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "orgcast_commit": cmd("git", "rev-parse", "HEAD"),
        "orgcast_uncommitted": cmd("git", "status", "--porcelain", "--", "app", "scripts").splitlines(),
        "python": platform.python_version(),
        "postgres": cmd("pg_config", "--version"),
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "kernel": platform.release(),
        "clock_ticks_per_s": TICKS,
        "bench_dir": str(BENCH),
    }


def median_of(rounds: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rounds if r[key] is not None]
    return statistics.median(values) if values else None


def render(res: dict[str, Any]) -> str:
    s, m, d = res["setup"], res["median"], res["after_deleting"]
    rounds = res["rounds"]
    exp = s["expected_statements"]

    def each(key: str, digits: int) -> str:
        return ", ".join(fmt(r[key], digits) for r in rounds)

    mean = res["mean"]["postgres_cpu_ms"]
    share = mean / 1000 / s["interval_s"] * 100
    rows = [
        ("sockets", f"{s['sockets']:,}"),
        ("users", f"{s['users']:,}"),
        ("distinct tokens", f"{s['distinct_tokens']:,}"),
        ("distinct memberships", f"{s['distinct_memberships']:,}"),
        ("statements per round", f"{m['statements']:.0f} (expected {exp['tokens']} token + "
                                 f"{exp['memberships']} membership, {BATCH:,} rows each at most)"),
        ("rows returned per round", f"{m['rows_returned']:,.0f}"),
        (f"seconds per round (median of {len(rounds)})", f"{m['seconds']:.3f} ({each('seconds', 3)})"),
        ("of which waiting for Postgres", f"{m['database_wait_seconds']:.3f} ({each('database_wait_seconds', 3)})"),
        ("this process's CPU per round, s", f"{m['python_cpu_seconds']:.3f} ({each('python_cpu_seconds', 3)})"),
        ("longest batch's Python work (event loop held), s",
         f"{m['longest_batch_python_seconds']:.3f} ({each('longest_batch_python_seconds', 3)})"),
        ("Postgres CPU per round, ms (all its processes)",
         f"{m['postgres_cpu_ms']:.0f} ({each('postgres_cpu_ms', 0)})"),
        ("of which the backend that ran the statements, ms",
         f"{fmt(m['backend_cpu_ms'], 0)} ({each('backend_cpu_ms', 0)})"),
        (f"Postgres CPU at one round per {s['interval_s']:.0f} s (mean of the rounds: {mean:.0f} ms)",
         f"{share:.3f} % of a core"),
        ("first round (warm-up, not above): s, Postgres ms",
         f"{res['warmup']['seconds']:.3f}, {res['warmup']['postgres_cpu_ms']:.0f}"),
        (f"after deleting {DELETED} memberships + {DELETED} tokens: round s, statements",
         f"{d['round']['seconds']:.3f}, {d['round']['statements']}"),
        ("  revoke calls (their sockets)", f"{d['round']['revoke_calls']} ({d['round']['revoked_sockets']}); "
                                           f"expected {d['expected']['revoke_calls']} "
                                           f"({d['expected']['revoked_sockets']})"),
        ("  token_gone calls", f"{d['round']['token_gone_calls']}; expected {d['expected']['token_gone_calls']}"),
        ("  found exactly those", "yes" if d["exact"] else "NO"),
    ]
    lines = ["| figure | value |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sockets", type=int, default=15000, help="idle sockets (default 15,000)")
    p.add_argument("--users", type=int, default=5000, help="users, one token each; socket j is user j %% U's "
                                                           "(default 5,000)")
    p.add_argument("--orgs", type=int, default=50, help="organizations; user i is a member of i %% orgs (default 50)")
    p.add_argument("--rounds", type=int, default=3, help="measured rounds, after one warm-up (default 3)")
    p.add_argument("--interval", type=float, default=60.0,
                   help="ORGCAST_REVALIDATE_INTERVAL the CPU share is computed for (default 60)")
    p.add_argument("--output", type=Path, default=None,
                   help="results JSON (default bench/results/<date>-revalidate[-n].json)")
    args = p.parse_args(argv)
    if min(args.sockets, args.users) < 3 * DELETED:
        p.error(f"--sockets and --users must both be at least {3 * DELETED}")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")

    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    pg = ThrowawayPostgres()
    db: Database | None = None
    try:
        log(f"throwaway Postgres on 127.0.0.1:{pg.port}")
        pg.start()
        log(f"loading {args.users:,} users, tokens and memberships of {args.orgs} organizations")
        load_s = load(pg, args.users, args.orgs)
        counts = pg.psql("SELECT (SELECT count(*) FROM oauth_access_tokens), "
                         "(SELECT count(*) FROM organization_users)").strip().split("|")
        db = Database(pg.dsn, pool_size=2, timeout=10)
        store = AuthStore(db, DEFAULT_TOKEN_SQL, DEFAULT_MEMBERSHIP_SQL)
        checker = AuthChecker(store, cache_ttl=0)
        row = db.fetch_one("SELECT pg_backend_pid()", {})  # opens the pool's connection, before the counting
        assert row is not None
        backend = int(row[0])
        counter = CountingDatabase(db)
        sockets = FakeSockets(args.sockets, args.users, args.orgs)
        rv = Revalidator(checker, sockets, interval=args.interval)
        batches = time_batches(rv, counter)
        tokens = {s.token for s in sockets.sessions.values()}
        pairs = {(o, s.user_id) for s in sockets.sessions.values() for o in s.organizations}
        expected = {"tokens": math.ceil(len(tokens) / BATCH), "memberships": math.ceil(len(pairs) / BATCH)}
        log(f"{len(sockets.sessions):,} sockets: {len(tokens):,} tokens, {len(pairs):,} memberships; "
            f"Postgres settling: {wait_postgres_idle(pg)} s")
        quiet = wait_quiet(10.0)
        load_before = os.getloadavg()

        warmup = one_round(rv, counter, sockets, pg, backend, batches)
        log(f"warm-up round: {warmup['seconds']:.3f} s, {warmup['statements']} statements")
        rounds = []
        for n in range(args.rounds):
            r = one_round(rv, counter, sockets, pg, backend, batches)
            rounds.append(r)
            log(f"round {n + 1}: {r['seconds']:.3f} s ({r['database_wait_seconds']:.3f} s waiting for Postgres), "
                f"{r['statements']} statements, Postgres {r['postgres_cpu_ms']:.0f} ms CPU")
        problems = [f"round {i + 1}: {r['statements']} statements, {r['revoke_calls']} revoke, "
                    f"{r['token_gone_calls']} token_gone" for i, r in enumerate([warmup, *rounds])
                    if r["statements"] != sum(expected.values()) or r["revoke_calls"] or r["token_gone_calls"]]

        del_members, del_tokens = pick_deleted(args.sockets, args.users, args.orgs)
        pg.psql("DELETE FROM organization_users WHERE (organization_id, user_id) IN ("
                + ", ".join(f"('{o}', '{u}')" for o, u in del_members) + ")")
        pg.psql("DELETE FROM oauth_access_tokens WHERE access_token IN ("
                + ", ".join(f"'{t}'" for t in del_tokens) + ")")
        last = one_round(rv, counter, sockets, pg, backend, batches)
        want_revoked = sorted((o, u, "forbidden") for o, u in del_members)
        want_gone = sorted((sid, "token_invalid") for t in del_tokens for sid in sockets.sids_of["ru" + t[4:]])
        want_revoked_sockets = sum(len(sockets.sids_of[u]) for _, u in del_members)
        exact = (sorted(sockets.revoked) == want_revoked and sorted(sockets.gone) == want_gone
                 and sockets.revoked_sockets == want_revoked_sockets)
        log(f"after deleting: {last['revoke_calls']} revoke ({last['revoked_sockets']} sockets), "
            f"{last['token_gone_calls']} token_gone: {'exactly those' if exact else 'NOT those'}")

        keys = ("statements", "rows_returned", "seconds", "database_wait_seconds", "python_cpu_seconds",
                "longest_batch_python_seconds", "postgres_cpu_ms", "backend_cpu_ms")
        results: dict[str, Any] = {
            "kind": "revalidate",
            "started": started,
            "argv": argv,
            "command": " ".join([".venv/bin/python", "bench/revalidate.py", *argv]),
            "environment": environment(),
            "machine": {"before": quiet, "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
            "setup": {
                "sockets": args.sockets, "users": args.users, "organizations": args.orgs,
                "rows_loaded": {"oauth_access_tokens": int(counts[0]), "organization_users": int(counts[1])},
                "load_seconds": load_s, "distinct_tokens": len(tokens), "distinct_memberships": len(pairs),
                "batch": BATCH, "expected_statements": expected, "interval_s": args.interval,
                "pool_size": 2, "timeout_s": 10, "cache_ttl": 0, "spread": 0, "backend_pid": backend,
            },
            "warmup": warmup,
            "rounds": rounds,
            "median": {k: median_of(rounds, k) for k in keys},
            # a jiffy is 10 ms: the mean over the rounds is the finer figure for small rounds
            "mean": {k: round(statistics.mean(r[k] for r in rounds), 1) for k in ("postgres_cpu_ms", "backend_cpu_ms")
                     if all(r[k] is not None for r in rounds)},
            "problems": problems,
            "after_deleting": {
                "memberships": [list(x) for x in del_members],
                "tokens": del_tokens,
                "round": last,
                "expected": {"revoke_calls": len(want_revoked), "revoked_sockets": want_revoked_sockets,
                             "token_gone_calls": len(want_gone)},
                "revoked": [list(x) for x in sorted(sockets.revoked)],
                "token_gone": [list(x) for x in sorted(sockets.gone)],
                "exact": exact,
            },
        }
        table = render(results)
        results["table"] = table
        print(table)
        for line in problems:
            print(f"problem: {line}")
        print(f"raw results: {save(results, results_path('revalidate', args.output))}")
        return 0 if exact and not problems else 1
    finally:
        if db is not None:
            db.close()
        pg.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
