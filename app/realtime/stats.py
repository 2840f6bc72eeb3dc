"""``/admin/stats``: what each worker says of itself, and the sum over all of them.

Every worker answers the cluster question ``stats`` (``bus/cluster.py``)
from its own state: its sockets, its busiest organizations, its bus
listener, its auth cache, its counts, and a sample of those every
``SAMPLE_EVERY`` seconds for the last ``SAMPLES`` (aligned to the wall
clock, so that the samples of every worker add up). ``summarize`` adds the
answers together for the route and the ``/admin`` page.
"""

from __future__ import annotations

import os
import socket
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import gevent

from app.realtime.background import Background

SAMPLE_EVERY = 10.0
#: ten minutes of samples
SAMPLES = 60
#: organizations each worker reports (the busiest); the sum names the TOP busiest of those
PER_WORKER = 100
TOP = 10


class WorkerStats(Background):
    """This worker's answer to ``stats``."""

    def __init__(self, *, peer: str, sockets: Callable[[], int], organizations: Callable[[], dict[str, int]],
                 bus: Callable[[], dict[str, Any]], auth: Callable[[], dict[str, int]],
                 tally: Counter[str], clock: Callable[[], float] = time.time,
                 warnings: Callable[[], list[str]] = list) -> None:
        self._peer = peer
        self._sockets = sockets
        self._organizations = organizations
        self._bus = bus
        self._auth = auth
        self._tally = tally
        #: what an operator should fix, in a sentence each (the /admin page shows them)
        self._warnings = warnings
        self._clock = clock
        self._started = clock()
        #: (time, sockets, published, delivered) every SAMPLE_EVERY seconds
        self.samples: deque[tuple[float, int, int, int]] = deque(maxlen=SAMPLES)

    def _run(self) -> None:
        while True:
            now = self._clock()
            gevent.sleep(SAMPLE_EVERY - now % SAMPLE_EVERY)
            self.sample()

    def sample(self) -> None:
        at = round(self._clock() / SAMPLE_EVERY) * SAMPLE_EVERY
        self.samples.append((at, self._sockets(), self._tally["published"], self._tally["delivered"]))

    def answer(self, _: str = "") -> dict[str, Any]:
        host, pid = socket.gethostname(), os.getpid()
        busiest = sorted(self._organizations().items(), key=lambda kv: (-kv[1], kv[0]))[:PER_WORKER]
        return {
            "worker": self._peer, "host": host, "pid": pid,
            "uptime_s": round(self._clock() - self._started, 1),
            "sockets": self._sockets(),
            "organizations": dict(busiest),
            "bus": self._bus(),
            "auth": self._auth(),
            "counts": {k: v for k, v in self._tally.items() if " " not in k},
            "attempts": {k.split(" ", 1)[1]: v for k, v in self._tally.items() if k.startswith("attempt ")},
            "answered_by": {k.split(" ", 1)[1]: v for k, v in self._tally.items() if k.startswith("auth ")},
            "samples": [list(s) for s in self.samples],
            "warnings": self._warnings(),
        }


def summarize(by_worker: dict[str, Any], partial: bool, latency_ms: dict[str, float]) -> dict[str, Any]:
    """The ``/admin/stats`` body: every worker, and their sum."""
    workers = [w for w in by_worker.values() if isinstance(w, dict)]
    organizations: Counter[str] = Counter()
    attempts: Counter[str] = Counter()
    answered: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    series: dict[float, list[int]] = {}
    for worker in workers:
        organizations.update(worker.get("organizations", {}))
        attempts.update(worker.get("attempts", {}))
        answered.update(worker.get("answered_by", {}))
        counts.update(worker.get("counts", {}))
        for at, sockets, published, delivered in worker.get("samples", []):
            row = series.setdefault(at, [0, 0, 0])
            row[0] += sockets
            row[1] += published
            row[2] += delivered
    lookups = sum(answered.values())
    hits = answered.get("cache", 0) + answered.get("coalesced", 0)
    buses = [w.get("bus", {}) for w in workers]
    return {
        "partial": partial,
        "sockets": sum(int(w.get("sockets", 0)) for w in workers),
        "workers": sorted(({"worker": w.get("worker"), "host": w.get("host"), "pid": w.get("pid"),
                            "uptime_s": w.get("uptime_s"), "sockets": w.get("sockets"), "bus": w.get("bus"),
                            "answer_ms": latency_ms.get(str(w.get("worker")))} for w in workers),
                          key=lambda w: (str(w["host"]), int(w["pid"] or 0))),
        "organizations": [{"organizationId": o, "sockets": n}
                          for o, n in sorted(organizations.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP]],
        "bus": {
            "backend": buses[0].get("backend") if buses else None,
            "workers_up": sum(1 for b in buses if b.get("state") == "up"),
            "workers": len(buses),
            "leader": next((w.get("worker") for w in workers if w.get("bus", {}).get("leader")), None),
            "lag_ms": max(latency_ms.values(), default=None),
        },
        "auth": {"answers": dict(answered), "cache_hit_rate": round(hits / lookups, 3) if lookups else None},
        "attempts": dict(attempts),
        "counts": dict(counts),
        # (time, sockets, published, delivered) of every worker, added together
        "samples": [[at, *row] for at, row in sorted(series.items())],
        "sample_every_s": SAMPLE_EVERY,
        # each worker's, once
        "warnings": sorted({str(text) for w in workers for text in w.get("warnings", [])}),
    }
