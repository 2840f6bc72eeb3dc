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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import gevent
import socketio

from app.auth import credentials
from app.auth.checker import AuthChecker, Principal
from app.errors import Refusal, Unavailable, ack_error, connect_error
from app.realtime.expiry import ExpiryClock, iso_utc
from app.realtime.fanout import Fanout
from app.realtime.recovery import Recovery, parse_offset
from app.realtime.rooms import organization_room, user_room
from app.timers import Timers
from app.transport.server import ADDRESS_KEY

log = logging.getLogger(__name__)

#: what a socket is sent after its CONNECT ack: (events, floor, the offset they carry: None for their own)
Replay = tuple[list[tuple[int, str]], int, int | None]

SLOW_DOWN = "Too many subscribe or refresh requests from this socket; slow down."


class Observer(Protocol):
    """Told of every connect attempt and socket (the metrics implement it)."""

    def attempt(self, result: str) -> None: ...
    def socket_opened(self) -> None: ...
    def socket_closed(self) -> None: ...
    def recovery(self, recovered: bool) -> None: ...
    def revoked(self, reason: str, count: int = 1) -> None: ...


class Latest(Protocol):
    def latest(self, room: str, count: int, through: int) -> list[tuple[int, str, tuple[str, ...]]]: ...


class PresenceHooks(Protocol):
    """Told when a socket enters or leaves an organization's room (realtime/presence.py, events on)."""

    def entered(self, organization_id: str, user_id: str) -> None: ...
    def left(self, organization_id: str, user_id: str) -> None: ...


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
    #: its private session id (recovery on)
    pid: str | None = None
    #: the session id its pid names: what its kept organizations are found by
    recovery_sid: str | None = None
    #: its organizations differ from the one it connected with, and are kept for its recovery
    kept: bool = False
    #: its token (in memory only: the re-check while connected asks the database with it)
    token: str = ""
    #: the requests it may still make at once (subscribe, refresh), and when that was counted
    budget: float = 10.0
    budget_at: float = 0.0


@dataclass
class Admission:
    """An accepted CONNECT, before its socket is admitted."""

    principal: Principal
    address: str
    organizations: list[str]
    token: str = ""
    #: (pid, the session id it names, the client's offset) when its session may be recovered
    recovering: tuple[str, str, int] | None = None
    #: time.monotonic() when the check began
    started: float = 0.0
    #: the organizations kept for it differ from the one it connects with
    kept: bool = False
    #: how many of its organization's latest events it asked for (capped)
    rewind: int = 0
    #: a stream resuming after this position (Server-Sent Events' Last-Event-ID)
    resume: int | None = None
    #: set by admit: the resume was too old (the client must reload)
    resync: bool = False


class OrgcastNamespace(socketio.Namespace):  # type: ignore[misc]
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

    # --- connect and disconnect (called by transport/server.py's _handle_connect)

    def admission(self, environ: dict[str, Any], auth: Any, session_id: str = "-", fresh: bool = False) -> Admission:
        """Check a CONNECT: who is it, may it listen, and can its session be recovered.

        A CONNECT that asks for recovery (a ``pid``) is checked against the
        database, past the auth cache: a cached "yes" never gives back a
        session a fresh check would refuse.

        :raise ConnectionRefusedError: (Socket.IO's) the refusal, in wire form
        """
        address = environ.get(ADDRESS_KEY) or environ.get("REMOTE_ADDR", "-")
        started = time.monotonic()
        recovering = self._recovery is not None and isinstance(auth, dict) and "pid" in auth
        try:
            creds = credentials.extract(auth, environ)
            principal = self._checker.authorize(creds, address, fresh=recovering or fresh)
            if self._fanout.cursor() is None and self._fanout.first_cursor(self._first_read_wait) is None:
                # This worker has not read the log yet: it cannot promise what follows.
                raise Unavailable("this worker has not reached the bus yet")
            if self._recovery is not None and not self._recovery.ready:
                self._recovery.load_secret()  # (the first connects of a worker only)
            rewind = self._rewind_of(auth.get("rewind") if isinstance(auth, dict) else None)
            if self._max_per_user and self._per_user[principal.user_id] >= self._max_per_user:
                refusal = Refusal("too_many_sockets")
                refusal.user_id = principal.user_id
                raise refusal
        except Refusal as exc:
            self._refused(exc, address, session_id, started)
            raise refusal_to_wire(exc) from None
        except Exception:
            # A bug must not read as a client error: refuse as retryable.
            log.exception("connect check failed")
            self._refused(Unavailable(), address, session_id, started)
            raise refusal_to_wire(Unavailable()) from None
        admission = Admission(principal, address, [principal.organization_id], creds.token, started=started,
                              rewind=rewind)
        if recovering:
            try:
                self._prepare_recovery(admission, auth)
            except Unavailable as exc:
                log.info("recovery not possible now (%s): connecting as new", exc.message)
                admission.recovering, admission.organizations = None, [principal.organization_id]
            except Exception:
                log.exception("recovery check failed: connecting as new")
                admission.recovering, admission.organizations = None, [principal.organization_id]
        return admission

    def _prepare_recovery(self, admission: Admission, auth: dict[str, Any]) -> None:
        assert self._recovery is not None
        user_id = admission.principal.user_id
        verified = self._recovery.verify(auth.get("pid"), user_id)
        if verified is None:
            return  # tampered, another user's, or from before the log lost its data: a new session
        sid, head = verified
        offset = parse_offset(auth.get("offset"))
        if "offset" in auth and auth["offset"] is not None and offset is None:
            return  # an offset this server never sent
        kept = self._recovery.organizations(sid)
        if kept is not None:
            # What it subscribed to (or left); each checked again, past the cache. The one
            # it connects with is checked already, and stays only if it had not left it.
            others = [o for o in kept if o != admission.principal.organization_id][:self._max_subscriptions]
            still = self._checker.still_members(others, user_id)
            admission.organizations = [o for o in kept if o in still
                                       or o == admission.principal.organization_id]
            admission.kept = True
        admission.recovering = (auth["pid"], sid, head if offset is None else offset)

    def _refused(self, exc: Refusal, address: str, session_id: str, started: float) -> None:
        """The one log line and count of a refused CONNECT."""
        latency = round((time.monotonic() - started) * 1000, 1)
        if self._observer is not None:
            self._observer.attempt(exc.code)
        log.info("connect refused: %s, address %s, user %s, session %s (%.1f ms)", exc.code, address,
                 exc.user_id or "-", session_id, latency,
                 extra={"code": exc.code, "address": address, "user_id": exc.user_id, "session_id": session_id,
                        "latency_ms": latency})

    def refused_namespace(self, address: str, session_id: str) -> None:
        """A CONNECT to a namespace orgcast does not serve (transport/server.py answers it)."""
        self._refused(Refusal("namespace_invalid"), address, session_id, time.monotonic())

    def admit(self, sid: str, admission: Admission) -> Replay | None:
        """Admit the socket into its rooms; return what to send it after the ack (None: nothing).

        A recovered socket gets what it missed (after its offset: the floor); a
        new one that asked for a ``rewind``, its organization's latest events.

        While the history is read, what is published to its rooms waits for it (the gate).
        """
        principal = admission.principal
        recovering = admission.recovering
        session = self.sessions[sid] = Session(principal.user_id, admission.address, admission.organizations,
                                               principal.expires_at, None, sid, admission.kept, admission.token)
        self._per_user[principal.user_id] += 1
        rooms = self._rooms_of(sid)
        for room in rooms:
            self.enter_room(sid, room)
        resuming = recovering is None and admission.resume is not None and self._recovery is not None
        rewinding = recovering is None and not resuming and admission.rewind > 0
        held = recovering is not None or rewinding or resuming
        through = self._fanout.hold(sid) if held else self._fanout.cursor()
        missed: Replay | None = None
        if resuming:
            assert self._recovery is not None and admission.resume is not None
            try:
                events = self._recovery.missed(admission.resume, through or 0, rooms)
            except Exception as exc:
                log.info("reading the history failed (%s): resyncing", exc)
                events = None
            admission.resync = events is None
            missed = (events, admission.resume, None) if events is not None else ([], 0, None)
        if rewinding:
            # A page that opens: the organization's latest events, after the ack, before any live one.
            missed = (self._latest(rooms, organization_room(principal.organization_id), admission.rewind,
                                   through or 0), 0, through or 0)
        if recovering is not None and self._recovery is not None:
            pid, recovery_sid, offset = recovering
            try:
                events = self._recovery.missed(offset, through or 0, rooms)
            except Exception as exc:
                log.info("reading the history failed (%s): not recovered", exc)
                events = None
            if events is not None:
                missed = (events, offset, None)
                session.pid, session.recovery_sid = pid, recovery_sid
            else:
                self._demote(sid, session, principal.organization_id)
        if session.pid is None and self._recovery is not None:
            session.pid = self._recovery.pid_for(sid, principal.user_id, through or 0)
        if self._presence is not None:
            for organization_id in session.organizations:
                self._presence.entered(organization_id, principal.user_id)
        self._expiry.track(sid, principal.expires_at)
        log.debug("admitted socket %s: user %s, organization %s", sid, principal.user_id,
                  principal.organization_id)
        latency = round((time.monotonic() - admission.started) * 1000, 1)
        if self._observer is not None:
            self._observer.attempt("ok")
            self._observer.socket_opened()
            if recovering is not None:
                self._observer.recovery(missed is not None and missed[2] is None)
        log.info("connect ok: socket %s, user %s, organization %s, address %s%s (%.1f ms)", sid,
                 principal.user_id, principal.organization_id, admission.address,
                 "" if recovering is None else ", recovered" if missed is not None and missed[2] is None
                 else ", not recovered", latency,
                 extra={"code": "ok", "socket_id": sid, "user_id": principal.user_id,
                        "organization_id": principal.organization_id, "address": admission.address,
                        "latency_ms": latency})
        return missed

    def _demote(self, sid: str, session: Session, organization_id: str) -> None:
        """Not recovered after all: only the organization it connects with, as a new session."""
        for other in session.organizations:
            if other != organization_id:
                self.leave_room(sid, organization_room(other))
        session.organizations = [organization_id]
        session.kept = False

    def replay(self, sid: str, missed: Replay | None) -> None:
        """Send what a recovered socket missed (or a new one's rewind), then what was held for it meanwhile."""
        events, floor, tag = missed if missed is not None else ([], 0, None)
        self._fanout.release(sid, events, floor, tag)
        if missed is not None:
            log.info("socket %s %s: %d events", sid, "recovered" if tag is None else "rewound", len(events))

    def _rewind_of(self, value: Any) -> int:
        """The rewind a client asked for, capped at ORGCAST_REWIND_MAX.

        :raise Refusal: rewind_invalid (not a whole number from 0)
        """
        if value is None:
            return 0
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise Refusal("rewind_invalid")
        return min(value, self._rewind_max)

    def _latest(self, rooms: list[str], room: str, count: int, through: int) -> list[tuple[int, str]]:
        """Up to ``count`` of ``room``'s latest events through ``through`` that are for a socket in ``rooms``."""
        if self._history is None or count <= 0:
            return []
        try:
            events = self._history.latest(room, count, through)
        except Unavailable as exc:
            log.info("rewind of %s skipped: %s", room, exc.message)
            return []
        mine = set(rooms)
        return [(at, args) for at, args, excepted in events if not mine.intersection(excepted)]

    def pid_of(self, sid: str) -> str | None:
        session = self.sessions.get(sid)
        return session.pid if session is not None else None

    def _rooms_of(self, sid: str) -> list[str]:
        session = self.sessions[sid]
        return [*(organization_room(o) for o in session.organizations), user_room(session.user_id)]

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
