"""Presence: who of an organization is connected, on every worker and host.

The routes (``GET /api/v1/organizations/<id>/presence``,
``GET /api/v1/users/<id>/presence``) ask every worker for its own count
(``bus/cluster.py``) and add the answers up: right as soon as a socket is
admitted or gone, whichever worker holds it; a worker that does not answer
within ``ORGCAST_CLUSTER_TIMEOUT`` is left out and the answer says
``partial``. Nothing is stored for them, and the broadcast path does not
know presence exists.

With ``ORGCAST_PRESENCE_EVENTS=true`` the other sockets of the organization
also receive ``presence.join`` / ``presence.leave`` when a user's first
socket in the organization arrives and its last one goes, across workers:
each worker notes in the bus backend (``presence_join`` / ``presence_leave``)
whether it holds the user in the organization, and the change from no
worker to one, or from one to none, is the event — once per user, not per
socket. A worker found gone (killed, stopped, its host lost:
``Cluster.on_gone``, within ``DEAD_AFTER`` seconds) is forgotten there, and
the users it alone held leave. A worker told it was taken for gone (it was
only stopped) notes its users again.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Callable
from typing import Any, Protocol

import gevent
import gevent.event

from app.errors import Unavailable
from app.rooms import organization_room, user_room

log = logging.getLogger(__name__)

JOIN, LEAVE = "presence.join", "presence.leave"
SOURCE = "presence"
#: seconds after start before a worker forgets workers that the store holds and nobody heard
SETTLE = 15.0
#: seconds between a worker found gone and forgetting it: the clients of a worker that
#: stopped gracefully reconnect elsewhere meanwhile, and their users do not flap
GRACE = 4.0


class Store(Protocol):
    def presence_join(self, organization_id: str, user_id: str, worker: str) -> bool: ...
    def presence_leave(self, organization_id: str, user_id: str, worker: str) -> bool: ...
    def presence_forget(self, worker: str) -> list[tuple[str, str]]: ...
    def presence_workers(self) -> set[str]: ...


class Asker(Protocol):
    peer: str

    def ask(self, what: str, arg: str = "") -> Any: ...
    def alive(self) -> list[str]: ...


class Emitter(Protocol):
    def emit(self, rooms: list[str], except_rooms: list[str], args: list[Any], source: str) -> None: ...


class Presence:
    """This worker's part of presence: its own counts, the questions, and the events."""

    def __init__(self, cluster: Asker, *, members: Callable[[str], list[str]],
                 user_of: Callable[[str], str | None], organizations_of: Callable[[str], list[str]],
                 store: Store | None = None, emitter: Emitter | None = None,
                 clock: Callable[[], float] | None = None, linger: float = 0.0,
                 on_change: Callable[[bool, str, str], None] | None = None) -> None:
        #: seconds a user's last socket here is still counted after it went (a page reload)
        self._linger = linger
        #: told (joined, organization, user) of each change for the whole deployment (the webhooks)
        self._on_change = on_change
        self._lingering: dict[tuple[str, str], Any] = {}
        self._cluster = cluster
        #: the sids of this worker's sockets in a room
        self._members = members
        self._user_of = user_of
        self._organizations_of = organizations_of
        self._store = store
        self._emitter = emitter
        #: (organization, user) -> sockets of this worker (kept only with events on)
        self.held: Counter[tuple[str, str]] = Counter()
        self._changes: deque[tuple[str, str, bool]] = deque()
        self._wake = gevent.event.Event()
        self._runner: gevent.Greenlet | None = None
        self._janitor: gevent.Greenlet | None = None

    @property
    def events(self) -> bool:
        return self._store is not None

    # --- this worker's answers (run in the bus listener)

    def organization_here(self, organization_id: str) -> dict[str, int]:
        """Sockets per user of this worker in ``organization.<id>``."""
        users: Counter[str] = Counter()
        for sid in self._members(organization_room(organization_id)):
            user_id = self._user_of(sid)
            if user_id is not None:
                users[user_id] += 1
        return dict(users)

    def user_here(self, user_id: str) -> dict[str, Any]:
        """This worker's sockets of the user, and their count per organization."""
        organizations: Counter[str] = Counter()
        sids = self._members(user_room(user_id))
        for sid in sids:
            organizations.update(self._organizations_of(sid))
        return {"sockets": len(sids), "organizations": dict(organizations)}

    # --- the routes' answers (every worker)

    def organization(self, organization_id: str) -> dict[str, Any]:
        """:raise Unavailable: the bus did not take the question"""
        answers = self._cluster.ask("presence.organization", organization_id)
        users: Counter[str] = Counter()
        for counts in answers.by_peer.values():
            if isinstance(counts, dict):
                users.update({str(u): int(n) for u, n in counts.items()})
        return {"organizationId": organization_id,
                "users": [{"userId": u, "sockets": n} for u, n in sorted(users.items())],
                "userCount": len(users), "socketCount": sum(users.values()), "partial": answers.partial}

    def user(self, user_id: str) -> dict[str, Any]:
        """:raise Unavailable: the bus did not take the question"""
        answers = self._cluster.ask("presence.user", user_id)
        organizations: Counter[str] = Counter()
        sockets = 0
        for here in answers.by_peer.values():
            if isinstance(here, dict):
                sockets += int(here.get("sockets", 0))
                organizations.update({str(o): int(n) for o, n in here.get("organizations", {}).items()})
        return {"userId": user_id,
                "organizations": [{"organizationId": o, "sockets": n} for o, n in sorted(organizations.items())],
                "socketCount": sockets, "partial": answers.partial}

    # --- transitions of this worker's sockets (realtime/namespace.py), events on

    def entered(self, organization_id: str, user_id: str) -> None:
        """A socket of the user is in the organization's room now."""
        key = (organization_id, user_id)
        self.held[key] += 1
        if self.held[key] == 1:
            lingering = self._lingering.pop(key, None)
            if lingering is not None:
                lingering.kill(block=False)  # back within the linger: nothing left, nothing to say
                return
            self._queue(organization_id, user_id, True)

    def left(self, organization_id: str, user_id: str) -> None:
        """A socket of the user left the organization's room."""
        key = (organization_id, user_id)
        if self.held[key] <= 1:
            self.held.pop(key, None)
            if self._linger > 0:
                self._lingering[key] = gevent.spawn_later(self._linger, self._linger_over, key)
            else:
                self._queue(organization_id, user_id, False)
        else:
            self.held[key] -= 1

    def _linger_over(self, key: tuple[str, str]) -> None:
        if self._lingering.pop(key, None) is not None and key not in self.held:
            self._queue(key[0], key[1], False)

    def _queue(self, organization_id: str, user_id: str, joined: bool) -> None:
        self._changes.append((organization_id, user_id, joined))
        self._wake.set()

    # --- the store, from one greenlet (in order: a leave never overtakes its join)

    def start(self) -> None:
        if self._store is not None and self._runner is None:
            self._runner = gevent.spawn(self._apply_forever)
            self._janitor = gevent.spawn(self._forget_unknown)

    def stop(self) -> None:
        for runner in (self._runner, self._janitor):
            if runner is not None:
                runner.kill(block=False)
        self._runner = self._janitor = None

    def _apply_forever(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            while self._changes:
                organization_id, user_id, joined = self._changes[0]
                try:
                    self._apply(organization_id, user_id, joined)
                except Unavailable as exc:
                    log.warning("presence not noted (retrying): %s", exc.message)
                    gevent.sleep(1.0)
                    continue
                self._changes.popleft()

    def _apply(self, organization_id: str, user_id: str, joined: bool) -> None:
        assert self._store is not None
        # A change undone meanwhile (a reload of the page) needs no event.
        worker = self._cluster.peer
        if joined:
            first = self._store.presence_join(organization_id, user_id, worker)
            if first:
                self._changed(True, organization_id, user_id)
        elif self._store.presence_leave(organization_id, user_id, worker):
            self._changed(False, organization_id, user_id)

    def _changed(self, joined: bool, organization_id: str, user_id: str) -> None:
        """The user's first socket of the deployment arrived in the organization, or its last one went."""
        self._announce(JOIN if joined else LEAVE, organization_id, user_id)
        if self._on_change is not None:
            try:
                self._on_change(joined, organization_id, user_id)
            except Unavailable as exc:
                log.warning("the webhook of %s in %s not sent: %s", user_id, organization_id, exc.message)

    def _announce(self, event: str, organization_id: str, user_id: str) -> None:
        if self._emitter is None:
            return
        try:
            self._emitter.emit([organization_room(organization_id)], [user_room(user_id)],
                               [event, {"organizationId": organization_id, "userId": user_id}], SOURCE)
        except Unavailable as exc:
            log.warning("%s of %s in %s not sent: %s", event, user_id, organization_id, exc.message)

    # --- gone workers

    def forget(self, peer: str) -> None:
        """A worker is gone: its users leave where no other worker holds them (Cluster.on_gone)."""
        if self._store is None or peer == self._cluster.peer:
            return
        gevent.spawn_later(GRACE, self._forget, peer)

    def _forget(self, peer: str) -> None:
        assert self._store is not None
        try:
            gone = self._store.presence_forget(peer)
        except Unavailable as exc:
            log.warning("presence of gone worker %s not forgotten yet: %s", peer, exc.message)
            return  # the janitor tries again
        for organization_id, user_id in gone:
            self._changed(False, organization_id, user_id)
        if gone:
            log.info("worker %s gone: %d users left their organizations", peer, len(gone))

    def taken_for_gone(self) -> None:
        """Another worker forgot this one (it was stopped a while): note its users again."""
        if self._store is None:
            return
        for organization_id, user_id in list(self.held):
            self._queue(organization_id, user_id, True)

    def _forget_unknown(self) -> None:
        """Forget workers the store holds that no live worker is (a whole deployment restarted)."""
        assert self._store is not None
        gevent.sleep(SETTLE)
        while True:
            try:
                alive = set(self._cluster.alive())
                for peer in self._store.presence_workers() - alive:
                    self._forget(peer)
            except Unavailable:
                pass
            gevent.sleep(SETTLE)
