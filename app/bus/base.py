"""The bus base class: the logic above each backend's _publish / _listen (see the package docstring)."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any, Protocol

import gevent
import gevent.event

from app.bus import envelope
from app.bus.envelope import Marker, Message, Publication
from app.errors import Unavailable

log = logging.getLogger(__name__)

#: messages that arrive in the format a backend understands: (channel, payload)
SourceHandler = Callable[[str, Any], None]

IDLE, CONNECTING, UP, DOWN = "idle", "connecting", "up", "down"
#: what a client missed: (offset, the event's args as JSON, the rooms it was not for), in order
Missed = list[tuple[str, str, tuple[str, ...]]]
#: seconds stop() waits for the listener to unwind
STOP_WAIT = 2.0


class Observer(Protocol):
    """Told of what the listener hears and of its connection (the metrics implement it)."""

    def bus_message(self, bus: str) -> None: ...
    def bus_state(self, bus: str, up: bool, reconnect: bool = False) -> None: ...


class Bus:
    """Publish to every process; listen in this one, reconnecting for ever."""

    name = "bus"
    #: seconds between reconnection attempts: doubles from the first to the last
    backoff = (0.1, 5.0)

    def __init__(self) -> None:
        self._handler: Callable[[Message], None] | None = None
        self._runner: gevent.Greenlet | None = None
        self.observer: Observer | None = None
        self._state = IDLE
        self.leader = False
        self.reconnects = 0
        self.received = 0
        self.dropped = 0
        self.last_message_at: float | None = None
        self._markers: dict[str, gevent.event.Event] = {}

    @property
    def state(self) -> str:
        """idle (not started in this process), connecting, up, down."""
        return self._state

    @state.setter
    def state(self, state: str) -> None:
        was, self._state = self._state, state
        if self.observer is not None and state != was:
            self.observer.bus_state(self.name, state == UP, reconnect=was == UP and state == DOWN)

    # --- publishing

    #: keep every publication in the history (recovery of missed events), which assigns its offset
    recording = False

    def publish(self, message: Message) -> None:
        """Send a message to every process of the deployment.

        With ``recording``, a publication is also kept in the history, and
        the offset the history gives it travels with it, in one round trip.

        :raise Unavailable: this process cannot hear the bus, or the bus did not take it
        """
        if self.state in (CONNECTING, DOWN):
            raise Unavailable(f"the {self.name} bus is not connected; retry")
        if self.recording and isinstance(message, Publication) and message.offset is None:
            self._publish_recorded(message)
        else:
            self._publish(envelope.encode(message))

    def _publish(self, text: str) -> None:
        raise NotImplementedError

    def _publish_recorded(self, publication: Publication) -> None:
        raise NotImplementedError

    # --- history (recovery), for backends that keep it

    def history_since(self, offset: str, rooms: list[str]) -> Missed | None:
        """Events after ``offset`` in any of ``rooms``: (offset, args, except rooms), in order, once each.

        None when the history no longer holds all of them (trimmed by age or count).

        :raise Unavailable: the history did not answer
        """
        return self.history_since_many([(offset, rooms)])[0]

    def history_since_many(self, queries: list[tuple[str, list[str]]]) -> list[Missed | None]:
        """``history_since`` for each (offset, rooms), in one round trip.

        :raise Unavailable: the history did not answer
        """
        raise NotImplementedError

    def history_head(self) -> str:
        """The offset of the newest event kept (the start of a new socket's history).

        :raise Unavailable: the history did not answer
        """
        raise NotImplementedError

    def save_sessions(self, records: list[tuple[str, str]]) -> None:
        """Keep disconnected sessions (pid, JSON record) for the recovery window.

        :raise Unavailable: the store did not answer
        """
        raise NotImplementedError

    def take_sessions(self, pids: list[str]) -> list[str | None]:
        """Return and forget the records of disconnected sessions kept within the window, one per pid.

        A pid given twice is answered once (the first time), like two takes.

        :raise Unavailable: the store did not answer
        """
        raise NotImplementedError

    # --- presence (ORGCAST_PRESENCE_EVENTS): which workers hold a user in an organization

    def presence_join(self, organization_id: str, user_id: str, worker: str) -> bool:
        """Note that ``worker`` holds sockets of the user in the organization; True: no worker did before.

        :raise Unavailable: the store did not answer
        """
        raise NotImplementedError

    def presence_leave(self, organization_id: str, user_id: str, worker: str) -> bool:
        """Note that ``worker`` holds none any more; True: no worker does now.

        :raise Unavailable: the store did not answer
        """
        raise NotImplementedError

    def presence_forget(self, worker: str) -> list[tuple[str, str]]:
        """Forget a gone worker; return the (organization, user) pairs no worker holds now.

        Atomic: when several workers forget the same one, one of them gets the pairs.

        :raise Unavailable: the store did not answer
        """
        raise NotImplementedError

    def presence_workers(self) -> set[str]:
        """Every worker the store holds presence of.

        :raise Unavailable: the store did not answer
        """
        raise NotImplementedError

    # --- listening

    def start(self, handler: Callable[[Message], None]) -> None:
        """Listen in this process, handing each message to ``handler``."""
        self._handler = handler
        self.state = CONNECTING
        self._runner = gevent.spawn(self._run)

    def stop(self) -> None:
        """Stop listening and close the connections.

        The listener is killed (and waited for) before its connection closes:
        psycopg2 holds a connection's mutex through a query, across the green
        wait, so closing it under a listener suspended in a query blocks the
        whole process on that mutex (a worker stuck at exit until SIGKILL).
        """
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.kill(block=True, timeout=STOP_WAIT)
            if not runner.dead:
                log.warning("%s bus listener did not stop; leaving its connection to the exit", self.name)
                self.state = IDLE
                return
        self._close()
        self.state = IDLE

    def _run(self) -> None:
        delay = self.backoff[0]
        failures = 0
        while True:
            started = time.monotonic()
            try:
                self._listen()
            except gevent.GreenletExit:
                raise
            except Exception as exc:  # every failure of a connection: log it, reconnect
                if self._runner is not gevent.getcurrent():
                    return  # stopped: its connection was closed under it
                if self.state == UP or failures == 0:
                    log.warning("%s bus connection lost: %s; reconnecting", self.name, _describe(exc))
                    failures = 0
                else:
                    log.debug("%s bus still down: %s", self.name, _describe(exc))
                failures += 1
            self.state = DOWN
            self.leader = False
            self.reconnects += 1
            self._close()
            if time.monotonic() - started > 10:
                delay = self.backoff[0]  # it had been up a while: start over
            gevent.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, self.backoff[1])

    def _listen(self) -> None:
        """Connect, subscribe (set ``state = UP``), and hand messages on until the connection is lost."""
        raise NotImplementedError

    def _close(self) -> None:
        """Close the listening connection, if any."""

    def _received(self, text: str | bytes) -> None:
        """Decode one bus message and hand it on; garbage is counted and dropped."""
        self.received += 1
        self.last_message_at = time.time()
        if self.observer is not None:
            self.observer.bus_message(self.name)
        try:
            message = envelope.decode(text)
        except ValueError as exc:
            self.dropped += 1
            log.warning("dropped a message on the %s bus: %s", self.name, exc)
            return
        if isinstance(message, Marker):
            heard = self._markers.get(message.id)
            if heard is not None:
                heard.set()
            return
        if self._handler is not None:
            try:
                self._handler(message)
            except Exception:
                self.dropped += 1
                log.exception("handling a %s bus message failed", self.name)

    def barrier(self, timeout: float) -> bool:
        """Wait until this process has heard everything published on the bus before now.

        Publishes a marker and waits to hear it back (the bus keeps order);
        return False if it did not come back within ``timeout`` seconds.
        """
        if self.state != UP:
            return False
        marker = Marker(random.randbytes(8).hex())
        heard = self._markers[marker.id] = gevent.event.Event()
        try:
            self.publish(marker)
            return bool(heard.wait(timeout))
        except Unavailable:
            return False
        finally:
            self._markers.pop(marker.id, None)

    # --- readiness

    def probe(self) -> float:
        """Return how long ago a message or a keepalive arrived, in ms (readiness).

        :raise Unavailable: the bus is not connected in this process
        """
        if self.state in (CONNECTING, DOWN):
            raise Unavailable(f"the {self.name} bus is {self.state}")
        return 0.0

    def stats(self) -> dict[str, Any]:
        """What an operator wants to know of this process's bus."""
        return {"backend": self.name, "state": self.state, "leader": self.leader,
                "reconnects": self.reconnects, "received": self.received, "dropped": self.dropped}


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
