"""Connection state recovery that survives the worker: any worker of any host restores a session.

Socket.IO's own protocol, as socket.io-client 4.6+ speaks it by itself:

- the CONNECT ack carries a private session id: ``40{"sid", "pid"}``;
- every event carries its offset (its log position) as its last argument
  (the client keeps the last one it saw);
- on reconnect the client sends ``{pid, offset}`` in its CONNECT payload; if
  the server recovers the session it answers with the same ``pid`` (the
  client then sets ``socket.recovered = true``), sends the events after
  ``offset`` and keeps the socket id.

Nothing is written when a socket connects or when its worker dies: the
pid carries what recovery needs — the socket id, the position its history
starts after, and a MAC over both, the user and the log's epoch, keyed
with the deployment's secret (kept in the bus's store, made by the first
worker that asks) — so a pid another user presents, one that was tampered
with, or one from before the log lost its data does not verify, and the
client connects as new. Only the organizations a socket ``subscribe``\\d to
(or left) are written, when it does, and kept while it lives.

A returning client goes through the token check again, past the auth
cache, and each of its organizations through the membership check again:
only those it still belongs to come back.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
from collections.abc import Callable
from typing import Any

from app import process
from app.bus.ports import History, Sessions
from app.errors import Unavailable
from app.gather import Gathered

log = logging.getLogger(__name__)

#: bytes of HMAC-SHA256 a pid keeps
MAC_BYTES = 16


class Recovery:
    """Issue and verify pids, keep subscriptions, find what a returning client missed."""

    def __init__(self, history: History, sessions: Sessions, epoch: Callable[[], str | None]) -> None:
        self._history = history
        self._sessions = sessions
        self._epoch = epoch
        self._secret: bytes | None = None
        # A restart brings every client back at once: one round trip for all
        # the loads waiting, one for all the history reads (gather.py).
        self._since: Gathered[tuple[int, int, list[str]], Any] = Gathered(history.since_many)
        self._organizations: Gathered[str, list[str] | None] = Gathered(sessions.load_organizations)

    @property
    def ready(self) -> bool:
        """Whether pids can be given and checked (the secret is known)."""
        return self._secret is not None

    def load_secret(self) -> bool:
        """Fetch the deployment's secret; False if the store did not answer (try again later)."""
        if self._secret is None:
            try:
                self._secret = self._sessions.secret()
            except Unavailable as exc:
                log.warning("the recovery secret is not known yet: %s", exc.message)
                return False
        return True

    def _mac(self, nonce: str, sid: str, head: int, user_id: str) -> str | None:
        epoch = self._epoch()
        if self._secret is None or epoch is None:
            return None
        message = f"{epoch}\0{nonce}\0{sid}\0{head}\0{user_id}".encode()
        digest = hmac.new(self._secret, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest[:MAC_BYTES]).decode("ascii").rstrip("=")

    def pid_for(self, sid: str, user_id: str, head: int) -> str | None:
        """A new pid (never given before) for a session of ``user_id`` whose history starts after ``head``.

        None when it is not possible now (the secret or the log's epoch is not known yet).
        """
        nonce = base64.urlsafe_b64encode(process.random_bytes(6)).decode("ascii")
        mac = self._mac(nonce, sid, head, user_id)
        return None if mac is None else f"{head}.{sid}.{nonce}.{mac}"

    def verify(self, pid: Any, user_id: str) -> tuple[str, int] | None:
        """(sid, head) of a pid this deployment gave ``user_id`` in this epoch; None for any other."""
        if not isinstance(pid, str) or len(pid) > 160 or pid.count(".") != 3:
            return None
        head_text, sid, nonce, mac = pid.split(".")
        if not head_text.isdigit() or len(head_text) > 20 or not sid:
            return None
        expected = self._mac(nonce, sid, int(head_text), user_id)
        if expected is None or not hmac.compare_digest(expected, mac):
            return None
        return sid, int(head_text)

    def organizations(self, sid: str) -> list[str] | None:
        """The organizations kept for the session ``sid`` (None: the one it connected with).

        :raise Unavailable: the store did not answer
        """
        return self._organizations(sid)

    def save(self, sid: str, organizations: list[str]) -> None:
        """Keep a live session's organizations (after a subscribe or unsubscribe); a failure costs its recovery."""
        try:
            self._sessions.save_organizations(sid, organizations)
        except Unavailable as exc:
            log.warning("the organizations of session %s are not kept for its recovery: %s", sid, exc.message)

    def keep(self, sids: list[str]) -> None:
        """Keep the organizations of these live sessions for another while."""
        try:
            self._sessions.keep_organizations(sids)
        except Unavailable as exc:
            log.warning("the organizations of %d sessions were not kept longer: %s", len(sids), exc.message)

    def missed(self, after: int, through: int, rooms: list[str]) -> list[tuple[int, str]] | None:
        """Events in (after, through] for a socket in ``rooms``, in order; None: not recoverable.

        :raise Unavailable: the history did not answer
        """
        if after > through:
            # The client comes from a worker that was ahead of this one: recoverable
            # if the log did give that position (the caller then skips up to it).
            return [] if self._since((after, after, [])) is not None else None
        events = self._since((after, through, rooms))
        if events is None:
            return None
        mine = set(rooms)
        return [(at, args) for at, args, excepted in events if not mine.intersection(excepted)]


def parse_offset(value: Any) -> int | None:
    """A client's offset as a position; None for anything this server never sent."""
    if isinstance(value, str) and value.isdigit() and len(value) <= 20:
        return int(value)
    return None
