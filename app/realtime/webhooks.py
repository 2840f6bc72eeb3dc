"""Webhooks of who comes and goes, in the format of Pusher Channels' (contract §5.5).

The application learns when an organization's first socket arrives anywhere
in the deployment and its last one goes (``channel_occupied`` /
``channel_vacated``, channel ``organization.<id>``), and when a user's
first socket there arrives and its last one goes (``member_added`` /
``member_removed`` with ``user_id``), so that the webhook helpers of
Pusher's server libraries read them unchanged: ``POST`` of
``{"time_ms", "events": [...]}`` with ``X-Pusher-Key`` and
``X-Pusher-Signature`` (hex HMAC-SHA256 of the raw body, keyed with the
secret).

Once for the whole deployment, in order per organization: each worker notes
in the presence store which users it holds (``realtime/presence.py``, with
``ORGCAST_WEBHOOK_LINGER`` before a leave, so that a page reload says
nothing), and the one worker that sees a user's first arrival or last leave
appends it to the bus's log (``Member``). The leader alone — the worker
that hears the backends' channels — reads those entries in log order, keeps
who is in each organization (from the store when it becomes the leader),
and sends. A killed worker's users leave when the others find it gone
(within 15 s: ``bus/cluster.py``'s DEAD_AFTER and presence's GRACE).

Sending never slows a delivery or a connect: events wait in a bounded queue
(the oldest dropped and counted past ``QUEUE``), batches of up to 100 go
from one greenlet, and a receiver that answers non-2xx or not at all is
retried with backoff for up to 5 minutes, then the batch is dropped, counted
and logged. Written with the standard library's HTTP client (a runtime
dependency less); gevent makes it cooperative.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import gevent
import gevent.event

from app.bus.envelope import Member
from app.errors import Unavailable
from app.realtime.background import Background
from app.rooms import organization_room

log = logging.getLogger(__name__)

#: events waiting to be sent, at most
QUEUE = 10_000
#: events in one request, at most
BATCH = 100
#: seconds a batch is retried before it is dropped
RETRY_FOR = 300.0
#: seconds a request may take
TIMEOUT = 5.0


class Pairs(Protocol):
    def presence_pairs(self) -> set[tuple[str, str]]: ...


class Observer(Protocol):
    def webhook(self, result: str, count: int = 1) -> None: ...


def signature(secret: str, body: bytes) -> str:
    """Pusher's ``X-Pusher-Signature``: the hex HMAC-SHA256 of the raw body."""
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class Webhooks(Background):
    """The leader's view of who is where, and the sender of the changes."""

    def __init__(self, url: str, key: str, secret: str, *, is_leader: Callable[[], bool], store: Pairs,
                 observer: Observer | None = None, clock: Callable[[], float] = time.time) -> None:
        self._url = url
        self._key = key
        self._secret = secret
        self._is_leader = is_leader
        self._store = store
        self._observer = observer
        self._clock = clock
        #: who is in each organization, as the leader knows it (None: not the leader)
        self._members: dict[str, set[str]] | None = None
        self._queue: deque[dict[str, Any]] = deque()
        self._wake = gevent.event.Event()
        self._failing = False
        #: batches sent, and events dropped
        self.sent = self.dropped = 0

    # --- the changes, in log order (the bus listener)

    def member(self, change: Member) -> None:
        """A user's first arrival in an organization, or its last leave, for the whole deployment."""
        if not self._is_leader():
            self._members = None
            return
        if self._members is None:
            try:
                pairs = self._store.presence_pairs()
            except Unavailable as exc:
                log.warning("webhooks: who is where is not known (%s); starting from nobody", exc.message)
                pairs = set()
            self._members = {}
            for organization_id, user_id in pairs:
                self._members.setdefault(organization_id, set()).add(user_id)
            if change.joined:  # (this arrival is in the store already)
                self._members.get(change.organization_id, set()).discard(change.user_id)
                if not self._members.get(change.organization_id):
                    self._members.pop(change.organization_id, None)
        channel = organization_room(change.organization_id)
        users = self._members.setdefault(change.organization_id, set())
        if change.joined and change.user_id not in users:
            if not users:
                self._send({"name": "channel_occupied", "channel": channel})
            users.add(change.user_id)
            self._send({"name": "member_added", "channel": channel, "user_id": change.user_id})
        elif not change.joined and change.user_id in users:
            users.discard(change.user_id)
            self._send({"name": "member_removed", "channel": channel, "user_id": change.user_id})
            if not users:
                self._send({"name": "channel_vacated", "channel": channel})
        if not users:
            self._members.pop(change.organization_id, None)

    def _send(self, event: dict[str, Any]) -> None:
        if len(self._queue) >= QUEUE:
            self._queue.popleft()
            self._drop("queue_full", 1)
        self._queue.append(event)
        self._wake.set()

    # --- the sender

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch = [self._queue.popleft() for _ in range(min(BATCH, len(self._queue)))]
                self._deliver(batch)

    def _deliver(self, batch: list[dict[str, Any]]) -> None:
        first = time.monotonic()
        delay = 1.0
        while True:
            body = json.dumps({"time_ms": int(self._clock() * 1000), "events": batch},
                              separators=(",", ":")).encode()
            problem = self._post(body)
            if problem is None:
                self.sent += 1
                if self._observer is not None:
                    self._observer.webhook("sent", len(batch))
                if self._failing:
                    log.warning("webhooks: the receiver answers again")
                    self._failing = False
                return
            if not self._failing:
                log.warning("webhooks: the receiver did not take a batch (%s); retrying for up to %d s",
                            problem, RETRY_FOR)
                self._failing = True
            if time.monotonic() - first + delay > RETRY_FOR:
                log.error("webhooks: %d events dropped after %d s of retries (%s)", len(batch), RETRY_FOR, problem)
                self._drop("retries_exhausted", len(batch))
                return
            gevent.sleep(delay)
            delay = min(delay * 2, 60.0)

    def _post(self, body: bytes) -> str | None:
        """POST one batch; None when the receiver took it (2xx), else what went wrong."""
        request = urllib.request.Request(self._url, data=body, method="POST", headers={
            "Content-Type": "application/json", "X-Pusher-Key": self._key,
            "X-Pusher-Signature": signature(self._secret, body), "User-Agent": "orgcast-webhooks"})
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as answer:  # noqa: S310 (the configured URL)
                answer.read(65536)
                return None if 200 <= answer.status < 300 else f"HTTP {answer.status}"
        except urllib.error.HTTPError as exc:
            return f"HTTP {exc.code}"
        except (OSError, ValueError) as exc:
            return type(exc).__name__

    def _drop(self, reason: str, count: int) -> None:
        self.dropped += count
        if self._observer is not None:
            self._observer.webhook(reason, count)
