"""Connect, in one place: from an admitted transport to the first events after the ack.

The sequence, and the greenlet each step runs in (``transport/server.py``
and ``http/stream.py`` call the three steps below, in this order):

1. **Transport admitted** (``transport/engine.py``; the request's greenlet):
   the Engine.IO handshake, over WebSocket or polling, bounded by
   ``ORGCAST_CONNECT_TIMEOUT`` and ``ORGCAST_MAX_PENDING_PER_ADDRESS``
   (``transport/server.py``: ``_handle_eio_connect``). For an SSE stream,
   the request itself.
2. **CONNECT** arrives: ``transport/server.py``'s ``_handle_connect`` runs
   in the session's greenlet (one per socket, in order: ``_later``), and
   calls ``Connect.admission``:
   - **credentials** (``auth/credentials.py``): the token from ``auth``, the
     query or the Bearer header, and the organization;
   - **check** (``auth/checker.py``): token and membership, against the auth
     cache or the database (a recovering connect always asks the database);
   - the worker has read the log (its cursor), the per-user cap, the rewind;
   - **recovery** (``realtime/recovery.py``): the signed pid verified, the
     organizations kept for it checked again.
   A refusal becomes the CONNECT_ERROR here (``refusal_to_wire``) and is
   logged and counted once (``_refused``).
3. **Rooms** (``Connect.admit``, same greenlet, no I/O but the history
   read): the session, its organization and user rooms, presence, expiry;
   a recovering, rewinding or resuming socket is *held* at the worker's
   cursor (``fanout.hold``) while what it missed is read.
4. **Ack**: ``_handle_connect`` sends the CONNECT ack (with the pid).
5. **Replay** (``Connect.replay``): what it missed, or its rewind, then what
   was held for it meanwhile, each once, in order (``fanout.release``);
   from then on fan-out writes to it directly.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

import socketio

from app.auth import credentials
from app.auth.checker import AuthChecker, Principal
from app.errors import Refusal, Unavailable, connect_error
from app.realtime.expiry import ExpiryClock
from app.realtime.fanout import Fanout
from app.realtime.recovery import Recovery, parse_offset
from app.rooms import organization_room, user_room
from app.transport.server import ADDRESS_KEY

log = logging.getLogger("app.realtime.namespace")  # (the name the connect lines have always had)

#: what a socket is sent after its CONNECT ack: (events, floor, the offset they carry: None for their own)
Replay = tuple[list[tuple[int, str]], int, int | None]


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


class Connect:
    """The connect steps of ``OrgcastNamespace`` (its state is set up by its ``__init__``)."""

    _checker: AuthChecker
    _fanout: Fanout
    _recovery: Recovery | None
    _observer: Observer | None
    _presence: PresenceHooks | None
    _history: Latest | None
    _expiry: ExpiryClock
    _rewind_max: int
    _max_subscriptions: int
    _max_per_user: int
    _per_user: Counter[str]
    _first_read_wait: float
    sessions: dict[str, Session]
    #: (python-socketio's Namespace)
    enter_room: Any
    leave_room: Any

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

