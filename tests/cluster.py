"""Several gunicorn instances of several workers, and sockets spread over all of them.

Which worker accepts a connection is the kernel's choice: ``spread`` keeps
connecting until every worker of every instance holds at least one socket,
and knows which worker each one landed on from the worker's own debug log
line (``[pid] ... admitted socket <sid>``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftest import Listener, Server, start_gunicorn
from throwaway import children_of


@dataclass
class Cluster:
    """gunicorn instances sharing one database (and Redis)."""

    servers: list[Server]
    workers: list[int]
    placed: list[tuple[Listener, Server, int]] = field(default_factory=list)

    def worker_pids(self, server: Server) -> set[int]:
        return children_of(server.proc.pid)

    def wait_listening(self, timeout: float = 20.0) -> None:
        """Wait until every worker's bus listener is up (each logs it once)."""
        deadline = time.monotonic() + timeout
        for server, count in zip(self.servers, self.workers, strict=True):
            while True:
                listening = set(re.findall(r"\[(\d+)\] \[INFO\] app\.bus\.\w+: \S+ bus listening",
                                           server.output()))
                if len(listening & {str(p) for p in self.worker_pids(server)}) >= count:
                    break
                assert time.monotonic() < deadline, f"not all {count} workers listening:\n{server.output()[-3000:]}"
                time.sleep(0.05)

    def spread(self, listen: Callable[..., Listener], auth: dict[str, Any], per_worker: int = 1,
               limit: int = 400, via: str | None = None) -> list[tuple[Listener, Server, int]]:
        """Connect sockets with ``auth`` until every worker holds ``per_worker`` of them.

        ``via``: connect through this URL (nginx) instead of to each instance in turn.
        """
        placed: list[tuple[Listener, Server, int]] = []
        wanted = {(i, pid): per_worker for i, s in enumerate(self.servers) for pid in self.worker_pids(s)}
        attempts = 0
        while any(n > 0 for n in wanted.values()):
            attempts += 1
            assert attempts <= limit, f"sockets did not reach every worker: {wanted}"
            target = self.servers[attempts % len(self.servers)]
            listener = listen(via or target.url, auth=auth)
            assert listener.connect_error is None, listener.connect_error
            index, pid = self._locate(listener.client.get_sid(), None if via else target)
            if wanted.get((index, pid), 0) > 0:
                wanted[(index, pid)] -= 1
                placed.append((listener, self.servers[index], pid))
            else:
                listener.close()
        self.placed.extend(placed)
        return placed

    def _locate(self, sid: str, server: Server | None, timeout: float = 5.0) -> tuple[int, int]:
        deadline = time.monotonic() + timeout
        while True:
            for index, candidate in enumerate(self.servers):
                if server is not None and candidate is not server:
                    continue
                found = _admitted(sid).search(candidate.output())
                if found:
                    return index, int(found.group(1))
            assert time.monotonic() < deadline, f"no log line for socket {sid}"
            time.sleep(0.02)


@contextmanager
def running(env: dict[str, str], tmp_path: Path, workers: list[int]) -> Iterator[Cluster]:
    """One gunicorn instance per entry of ``workers`` (its worker count), all listening; stopped after."""
    servers: list[Server] = []
    try:
        for count in workers:
            servers.append(start_gunicorn({"ORGCAST_LOG_LEVEL": "debug", **env, "WEB_CONCURRENCY": str(count)},
                                          tmp_path))
        found = Cluster(servers, workers)
        found.wait_listening()
        yield found
    finally:
        for server in servers:
            server.stop()


def _admitted(sid: str) -> re.Pattern[str]:
    return re.compile(r"\[(\d+)\] \[DEBUG\] app\.realtime\.namespace: admitted socket " + re.escape(sid))


def worker_of(server: Server, sid: str, timeout: float = 5.0) -> int:
    """The pid of the worker that admitted socket ``sid`` (from its debug log)."""
    return Cluster([server], [0])._locate(sid, server, timeout)[1]
