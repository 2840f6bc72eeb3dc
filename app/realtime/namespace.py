"""The Socket.IO namespace: a socket's session, its rooms and its events, once admitted.

Connect itself, from the CONNECT packet to the events after its ack, is in
``realtime/connect.py`` (the ``Connect`` steps this namespace inherits).

Clients may send three events, each answered in its ack
(``{"ok": true, …}`` or ``errors.ack_error``: ``{"ok": false, "code", "message"}``):

- ``subscribe {organizationId}``: join another organization's room after the
  same membership check as connect (at most ``ORGCAST_MAX_SUBSCRIPTIONS``);
- ``unsubscribe {organizationId}``: leave it (the connect organization too);
- ``refresh {token}``: a newer token of the same user moves the socket's
  deadline (``realtime/expiry.py``).

Joins and leaves happen just before the ack, in the same greenlet step: an
event published before the ``ok`` of a subscribe does not reach the socket,
nor one published after the ``ok`` of an unsubscribe.

A refusal of a connect becomes its CONNECT_ERROR in ``realtime/connect.py``
(``errors.connect_error``: ``{"message", "data": {"code"}}``); one of an event,
its ack here.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import gevent
import socketio

from app.auth import credentials
from app.auth.checker import AuthChecker
from app.errors import Refusal, ack_error
from app.realtime.connect import Connect, Latest, Observer, PresenceHooks, Session
from app.realtime.expiry import ExpiryClock, iso_utc
from app.realtime.fanout import Fanout
from app.realtime.recovery import Recovery
from app.rooms import organization_room
from app.timers import Timers

log = logging.getLogger(__name__)

SLOW_DOWN = "Too many subscribe or refresh requests from this socket; slow down."


class OrgcastNamespace(Connect, socketio.Namespace):  # type: ignore[misc]
    """Authorize on connect; admit into organization.<id> and user.<user_id>."""

    #: events a client may send; any other is ignored
    client_events: frozenset[str] = frozenset({"subscribe", "unsubscribe", "refresh"})

    def __init__(self, checker: AuthChecker, fanout: Fanout, timers: Timers, *, expiry_warning: float,
                 max_subscriptions: int, max_sockets_per_user: int, recovery: Recovery | None = None,
                 observer: Observer | None = None, presence: PresenceHooks | None = None,
                 history: Latest | None = None, rewind_max: int = 100, namespace: str = "/") -> None:
        super().__init__(namespace)
        self._history = history
        self._rewind_max = rewind_max
        self._observer = observer
        self._presence = presence
        self._checker = checker
        self._fanout = fanout
        self._recovery = recovery
        #: set while the worker closes every session to stop (see closing_all)
        self._closing_all = False
        self._max_subscriptions = max_subscriptions
        self._max_per_user = max_sockets_per_user
        #: seconds a connect waits for a worker that just started to read the log
        self._first_read_wait = 2.0
        self._expiry = ExpiryClock(timers, expiry_warning, self._warn_expiring, self._expired)
        #: the session of each admitted socket, by sid
        self.sessions: dict[str, Session] = {}
        self._per_user: Counter[str] = Counter()

    # --- connect (realtime/connect.py) and disconnect

    def on_disconnect(self, sid: str, reason: Any = None) -> None:
        session = self.sessions.pop(sid, None)
        if session is None:
            return
        if self._observer is not None:
            self._observer.socket_closed()
        if self._presence is not None and not self._closing_all:
            # (A worker closing all its sessions to stop leaves its users to the
            # others, which forget it once it is gone: clients reconnect meanwhile.)
            for organization_id in session.organizations:
                self._presence.left(organization_id, session.user_id)
        log.debug("socket %s disconnected: %s", sid, reason, extra={"socket_id": sid})
        self._expiry.forget(sid)
        self._per_user[session.user_id] -= 1
        if self._per_user[session.user_id] <= 0:
            del self._per_user[session.user_id]

    def kept_sessions(self) -> list[str]:
        """The session ids whose organizations are kept for their recovery (to keep them longer)."""
        return [s.recovery_sid for s in self.sessions.values() if s.kept and s.recovery_sid]

    def _keep(self, session: Session, later: bool = False) -> None:
        """Keep the session's organizations for its recovery (they changed).

        ``later``: in a greenlet of its own (a revocation runs in the bus
        listener, which must not wait on the store).
        """
        if self._recovery is not None and session.recovery_sid is not None:
            session.kept = True
            if later:
                gevent.spawn(self._recovery.save, session.recovery_sid, list(session.organizations))
            else:
                self._recovery.save(session.recovery_sid, list(session.organizations))

    @contextmanager
    def closing_all(self) -> Iterator[None]:
        """A context for a worker closing every session to stop (presence is left to the others)."""
        self._closing_all = True
        try:
            yield
        finally:
            self._closing_all = False

    # --- client events

    #: subscribe and refresh requests a socket may make at once, and how many come back a second
    BURST, REFILL = 10.0, 1.0

    def _allowed(self, session: Session) -> bool:
        """Take one request from the socket's budget (issue 17: a refresh flood, one query each)."""
        now = time.monotonic()
        session.budget = min(self.BURST, session.budget + (now - session.budget_at) * self.REFILL)
        session.budget_at = now
        if session.budget < 1:
            return False
        session.budget -= 1
        return True

    def on_subscribe(self, sid: str, *args: Any) -> dict[str, Any]:
        session, data = self.sessions.get(sid), args[0] if args else None
        if session is None or not isinstance(data, dict):
            return ack_error("bad_request", 'subscribe takes {"organizationId": …}.')
        organization_id, refusal = _organization_of(data)
        if refusal is not None:
            return refusal
        try:
            rewind = self._rewind_of(data.get("rewind"))
        except Refusal as exc:
            return ack_error(exc.code)
        room = organization_room(organization_id)
        if organization_id in session.organizations:
            return {"ok": True, "room": room}
        if not self._allowed(session):
            return ack_error("rate_limited", SLOW_DOWN)
        if len(session.organizations) >= self._max_subscriptions:
            return ack_error("too_many_subscriptions")
        try:
            self._checker.check_membership(organization_id, session.user_id, session.address)
        except Refusal as exc:
            return ack_error(exc.code, exc.message)
        if self.sessions.get(sid) is not session:
            return ack_error("bad_request", "The socket disconnected meanwhile.")
        self.enter_room(sid, room)
        if rewind:
            through = self._fanout.hold(sid) or 0
            self._fanout.release(sid, self._latest(self._rooms_of(sid), room, rewind, through), tag=through)
        session.organizations.append(organization_id)
        if self._presence is not None:
            self._presence.entered(organization_id, session.user_id)
        self._keep(session)
        return {"ok": True, "room": room}

    def on_unsubscribe(self, sid: str, *args: Any) -> dict[str, Any]:
        session, data = self.sessions.get(sid), args[0] if args else None
        if session is None or not isinstance(data, dict):
            return ack_error("bad_request", 'unsubscribe takes {"organizationId": …}.')
        organization_id, refusal = _organization_of(data)
        if refusal is not None:
            return refusal
        room = organization_room(organization_id)
        if organization_id in session.organizations:
            self.leave_room(sid, room)
            session.organizations.remove(organization_id)
            if self._presence is not None:
                self._presence.left(organization_id, session.user_id)
            self._keep(session)
        return {"ok": True, "room": room}

    def on_refresh(self, sid: str, *args: Any) -> dict[str, Any]:
        session, data = self.sessions.get(sid), args[0] if args else None
        if session is None or not isinstance(data, dict):
            return ack_error("bad_request", 'refresh takes {"token": …}.')
        token = data.get("token")
        if token in (None, ""):
            return ack_error("token_missing")
        if not isinstance(token, str):
            return ack_error("token_invalid")
        if not self._allowed(session):
            return ack_error("rate_limited", SLOW_DOWN)
        organization_id = session.organizations[0] if session.organizations else ""
        try:
            expires_at = self._checker.refresh(token, session.user_id, organization_id or "-", session.address)
        except Refusal as exc:
            return ack_error(exc.code, exc.message)
        if self.sessions.get(sid) is session:
            session.expires_at = expires_at
            session.token = token
            self._expiry.track(sid, expires_at)
        return {"ok": True, "expiresAt": iso_utc(expires_at) if expires_at is not None else None}

    # --- rights taken back while connected (README, "Rights re-checked while connected")

    def revoke(self, organization_id: str, user_id: str, code: str = "forbidden") -> int:
        """The user left the organization: its sockets here hear ``revoked``, then leave the room.

        A socket left with no organization is disconnected. Runs in log
        order (the bus listener), so no event of the organization published
        after the revocation reaches them. Return how many sockets.
        """
        room = organization_room(organization_id)
        count = 0
        for sid in list(self._fanout.members(room)):
            session = self.sessions.get(sid)
            if session is None or session.user_id != user_id or organization_id not in session.organizations:
                continue
            count += 1
            self._tell_revoked(sid, code, organization_id)
            self.leave_room(sid, room)
            session.organizations.remove(organization_id)
            if self._presence is not None:
                self._presence.left(organization_id, user_id)
            if not session.organizations:
                gevent.spawn(self.server.disconnect, sid, namespace=self.namespace)
            else:
                self._keep(session, later=True)
        if count and self._observer is not None:
            self._observer.revoked(code, count)
        return count

    def token_gone(self, sid: str, code: str) -> None:
        """The socket's token no longer validates: ``revoked`` with no organization, then disconnected."""
        if sid not in self.sessions:
            return
        self._tell_revoked(sid, code, None)
        if self._observer is not None:
            self._observer.revoked(code, 1)
        gevent.spawn(self.server.disconnect, sid, namespace=self.namespace)

    def _tell_revoked(self, sid: str, code: str, organization_id: str | None) -> None:
        log.info("socket %s: revoked (%s) %s", sid, code, organization_id or "its token",
                 extra={"socket_id": sid, "code": code, "organization_id": organization_id})
        args = json.dumps(["revoked", {"code": code, "organizationId": organization_id}], separators=(",", ":"))
        self._fanout.to_socket(sid, args)

    # --- expiry

    def _warn_expiring(self, sid: str, expires_at: float) -> None:
        args = json.dumps(["session_expiring", {"expiresAt": iso_utc(expires_at)}], separators=(",", ":"))
        self._fanout.to_socket(sid, args)

    def _expired(self, sid: str) -> None:
        # Out of the timer greenlet: the disconnect handlers may do I/O.
        gevent.spawn(self.server.disconnect, sid, namespace=self.namespace)

    # internal: socketio.namespace.Namespace.trigger_event
    def trigger_event(self, event: Any, *args: Any) -> Any:
        """Dispatch the server's own events and ours; ignore what clients invent.

        python-socketio routes a client's EVENT packet named "connect" or
        "disconnect" here too (transport/server.py refuses those names before;
        this stays as the second line). Its own calls come while the socket is
        still connecting or already disconnecting, a client's while it is connected.
        """
        if not isinstance(event, str):
            return self.server.not_handled
        if event in ("connect", "disconnect"):
            if self.server.manager.is_connected(args[0], self.namespace):
                log.debug("ignored client event %r", event)
                return self.server.not_handled
            return super().trigger_event(event, *args)
        if event in self.client_events:
            return super().trigger_event(event, *args)
        log.debug("ignored client event %r", event[:64])
        return self.server.not_handled


def _organization_of(data: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
    """(organization id, None) of a subscribe payload, or ("", the refusal's ack)."""
    raw = data.get("organizationId")
    if raw in (None, ""):
        return "", ack_error("organization_missing")
    value = raw if isinstance(raw, str) else str(raw) if isinstance(raw, int) and not isinstance(raw, bool) else ""
    if not credentials.is_valid_organization_id(value):
        return "", ack_error("organization_invalid")
    return value, None
