"""The Socket.IO namespace: the connect check, the rooms, and the socket's session.

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

This is the only module that turns a ``Refusal`` into a Socket.IO
CONNECT_ERROR (``errors.connect_error``: ``{"message", "data": {"code"}}``).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import gevent
import socketio

from app.auth import credentials
from app.auth.checker import AuthChecker, Principal
from app.errors import Refusal, Unavailable, ack_error, connect_error
from app.realtime.expiry import ExpiryClock, iso_utc
from app.realtime.fanout import Fanout
from app.realtime.rooms import organization_room, user_room
from app.realtime.server import ADDRESS_KEY
from app.realtime.timers import Timers

log = logging.getLogger(__name__)


def refusal_to_wire(exc: Refusal) -> socketio.exceptions.ConnectionRefusedError:
    """Build the CONNECT_ERROR python-socketio sends for a refusal."""
    wire = connect_error(exc.code, exc.message)
    return socketio.exceptions.ConnectionRefusedError(wire["message"], wire["data"])


@dataclass(slots=True)
class Session:
    """What the server keeps of an admitted socket."""

    user_id: str
    address: str
    #: the organization it connected to, then those it subscribed to
    organizations: list[str] = field(default_factory=list)
    expires_at: float | None = None


class OrgcastNamespace(socketio.Namespace):  # type: ignore[misc]
    """Authorize on connect; admit into organization.<id> and user.<user_id>."""

    #: events a client may send; any other is ignored
    client_events: frozenset[str] = frozenset({"subscribe", "unsubscribe", "refresh"})

    def __init__(self, checker: AuthChecker, fanout: Fanout, timers: Timers, *, expiry_warning: float,
                 max_subscriptions: int, max_sockets_per_user: int, namespace: str = "/") -> None:
        super().__init__(namespace)
        self._checker = checker
        self._fanout = fanout
        self._max_subscriptions = max_subscriptions
        self._max_per_user = max_sockets_per_user
        self._expiry = ExpiryClock(timers, expiry_warning, self._warn_expiring, self._expired)
        #: the session of each admitted socket, by sid
        self.sessions: dict[str, Session] = {}
        self._per_user: Counter[str] = Counter()

    # --- connect and disconnect

    def on_connect(self, sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        address = environ.get(ADDRESS_KEY) or environ.get("REMOTE_ADDR", "-")
        started = time.monotonic()
        try:
            creds = credentials.extract(auth, environ)
            principal = self._checker.authorize(creds, address)
            if self._max_per_user and self._per_user[principal.user_id] >= self._max_per_user:
                raise Refusal("too_many_sockets")
        except Refusal as exc:
            log.info("refused %s: %s (%.1f ms)", address, exc.code, (time.monotonic() - started) * 1000)
            raise refusal_to_wire(exc) from None
        except Exception:
            # A bug must not read as a client error: refuse as retryable.
            log.exception("connect check failed")
            raise refusal_to_wire(Unavailable()) from None
        self._admit(sid, principal, address)
        log.debug("admitted socket %s: user %s, organization %s", sid, principal.user_id,
                  principal.organization_id)

    def _admit(self, sid: str, principal: Principal, address: str) -> None:
        self.sessions[sid] = Session(principal.user_id, address, [principal.organization_id],
                                     principal.expires_at)
        self._per_user[principal.user_id] += 1
        self.enter_room(sid, organization_room(principal.organization_id))
        self.enter_room(sid, user_room(principal.user_id))
        self._expiry.track(sid, principal.expires_at)

    def on_disconnect(self, sid: str, reason: Any = None) -> None:
        session = self.sessions.pop(sid, None)
        if session is None:
            return
        self._expiry.forget(sid)
        self._per_user[session.user_id] -= 1
        if self._per_user[session.user_id] <= 0:
            del self._per_user[session.user_id]

    # --- client events

    def on_subscribe(self, sid: str, *args: Any) -> dict[str, Any]:
        session, data = self.sessions.get(sid), args[0] if args else None
        if session is None or not isinstance(data, dict):
            return ack_error("bad_request", 'subscribe takes {"organizationId": …}.')
        organization_id, refusal = _organization_of(data)
        if refusal is not None:
            return refusal
        room = organization_room(organization_id)
        if organization_id in session.organizations:
            return {"ok": True, "room": room}
        if len(session.organizations) >= self._max_subscriptions:
            return ack_error("too_many_subscriptions")
        try:
            self._checker.check_membership(organization_id, session.user_id, session.address)
        except Refusal as exc:
            return ack_error(exc.code, exc.message)
        if self.sessions.get(sid) is not session:
            return ack_error("bad_request", "The socket disconnected meanwhile.")
        self.enter_room(sid, room)
        session.organizations.append(organization_id)
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
        organization_id = session.organizations[0] if session.organizations else ""
        try:
            expires_at = self._checker.refresh(token, session.user_id, organization_id or "-", session.address)
        except Refusal as exc:
            return ack_error(exc.code, exc.message)
        if self.sessions.get(sid) is session:
            session.expires_at = expires_at
            self._expiry.track(sid, expires_at)
        return {"ok": True, "expiresAt": iso_utc(expires_at) if expires_at is not None else None}

    # --- expiry

    def _warn_expiring(self, sid: str, expires_at: float) -> None:
        args = json.dumps(["session_expiring", {"expiresAt": iso_utc(expires_at)}], separators=(",", ":"))
        self._fanout.to_socket(sid, args)

    def _expired(self, sid: str) -> None:
        # Out of the timer greenlet: the disconnect handlers may do I/O.
        gevent.spawn(self.server.disconnect, sid, namespace=self.namespace)

    def trigger_event(self, event: Any, *args: Any) -> Any:
        """Dispatch the server's own events and ours; ignore what clients invent.

        python-socketio routes a client's EVENT packet named "connect" or
        "disconnect" here too (realtime/server.py refuses those names before;
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
