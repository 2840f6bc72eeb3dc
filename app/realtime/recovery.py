"""Connection state recovery: a client that reconnects gets the events it missed.

Socket.IO's own protocol, as socket.io-client 4.6+ speaks it by itself:

- the CONNECT ack carries a private session id: ``40{"sid", "pid"}``;
- every event carries its offset as its last argument (the client keeps the
  last one it saw);
- on reconnect the client sends ``{pid, offset}`` in its CONNECT payload; if
  the server recovers the session it answers with the same ``pid`` (the
  client then sets ``socket.recovered = true``), sends the events after
  ``offset`` and keeps the socket id.

The history lives in the bus backend, where every worker and instance reads
it (``bus.history_since``); a session is kept there when its transport dies
(``bus.save_sessions``), for ``ORGCAST_RECOVERY_WINDOW`` seconds, and taken
once. Recovery runs after the same authorization as any connect, and only
restores the organizations the user still belongs to.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from app import process
from app.errors import Unavailable
from app.gather import Gathered, Shared

log = logging.getLogger(__name__)

#: disconnect reasons after which a session may be recovered (Node: RECOVERABLE_DISCONNECT_REASONS)
RECOVERABLE = frozenset({"transport close", "transport error", "ping timeout", "server shutting down"})


class HistoryStore(Protocol):
    def history_since_many(self, queries: list[tuple[str, list[str]]]) -> list[Any]: ...
    def history_head(self) -> str: ...
    def save_sessions(self, records: list[tuple[str, str]]) -> None: ...
    def take_sessions(self, pids: list[str]) -> list[str | None]: ...


@dataclass
class Saved:
    """What is kept of a disconnected session."""

    sid: str
    user_id: str
    organizations: list[str]
    #: the offset to replay from when the client saw no event (the head when it connected)
    head: str | None
    disconnected_at: float


class Recovery:
    """Issue pids, keep disconnected sessions, find what a returning client missed."""

    def __init__(self, store: HistoryStore, window: float, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._window = window
        self._clock = clock
        # A restart brings every client back at once: one round trip for all
        # the takes waiting, one for all the history reads (gather.py).
        self._take: Gathered[str, str | None] = Gathered(store.take_sessions)
        self._since: Gathered[tuple[str, list[str]], Any] = Gathered(store.history_since_many)
        self._head: Shared[str, str] = Shared(lambda _: store.history_head())

    @staticmethod
    def new_pid() -> str:
        """A private session id (only the client it was given to knows it)."""
        return base64.urlsafe_b64encode(process.random_bytes(12)).decode("ascii")  # secrets.token_urlsafe(12)

    def head(self) -> str | None:
        """The newest offset of the history, None when it does not answer."""
        try:
            return self._head("")
        except Unavailable as exc:
            log.warning("history head unknown: %s", exc.message)
            return None

    def take(self, pid: Any) -> Saved | None:
        """The kept session of ``pid``, if it is kept and within the window (taken once)."""
        if not isinstance(pid, str) or not 0 < len(pid) <= 64:
            return None
        try:
            record = self._take(pid)
        except Unavailable as exc:
            log.warning("recovery skipped: %s", exc.message)
            return None
        if record is None:
            return None
        try:
            saved = Saved(**json.loads(record))
        except (ValueError, TypeError):
            return None
        if self._clock() - saved.disconnected_at > self._window:
            return None
        return saved

    def save(self, sessions: list[tuple[str, Saved]]) -> None:
        """Keep disconnected sessions for the window; losing them only costs their recovery."""
        try:
            self._store.save_sessions([(pid, json.dumps(asdict(saved))) for pid, saved in sessions])
        except Unavailable as exc:
            log.warning("%d sessions not kept for recovery: %s", len(sessions), exc.message)

    def missed(self, offset: str, rooms: list[str]) -> list[tuple[str, str]] | None:
        """Events after ``offset`` for a socket in ``rooms``: (offset, args), in order; None: not recoverable."""
        try:
            events = self._since((offset, rooms))
        except Unavailable as exc:
            log.warning("recovery skipped: %s", exc.message)
            return None
        if events is None:
            return None
        mine = set(rooms)
        return [(at, args) for at, args, excepted in events if not mine.intersection(excepted)]
