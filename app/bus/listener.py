"""The logic above each backend's listening connection: reconnect for ever, and read the log from a cursor.

A backend's ``_listen()`` connects, calls ``_resumed(epoch, head,
trimmed)`` once it can read, hands each entry it reads to
``_entry(position, text)`` and each signal to ``_signal(text)``, and returns
(or raises) when its connection is lost; ``_run`` reconnects with backoff.

The cursor is the position of the last entry handed on. After any
reconnect the backend reads from it (``_read_after``), so nothing appended
meanwhile is skipped, and an entry heard twice (its doorbell and the
catch-up) is handed on once. Continuity is lost only when the log itself
lost entries the cursor had not reached — trimmed while this worker was
away longer than the window, or the log's *epoch* changed (Redis restarted
without its data, orgcast's schema made anew) — and then ``on_lost`` runs:
the sockets of this worker may have missed events and must be told.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any, Protocol

import gevent

from app.bus import envelope
from app.bus.envelope import Entry, Signal
from app.errors import Unavailable

log = logging.getLogger(__name__)

IDLE, CONNECTING, UP, DOWN = "idle", "connecting", "up", "down"
#: seconds stop() waits for the listener to unwind
STOP_WAIT = 2.0
#: entries read per catch-up query
CATCH_UP = 1000
#: what a socket that reconnects uses when it saw nothing, and the log's start: before any entry
START = 0


class Observer(Protocol):
    """Told of what the listener hears and of its connection (the metrics implement it)."""

    def bus_message(self, bus: str) -> None: ...
    def bus_state(self, bus: str, up: bool, reconnect: bool = False) -> None: ...


class Listener:
    """A connection that listens in this process, reconnecting for ever."""

    name = "bus"
    #: seconds between reconnection attempts: doubles from the first to the last
    backoff = (0.1, 5.0)

    def __init__(self) -> None:
        self._runner: gevent.Greenlet | None = None
        self.observer: Observer | None = None
        self._state = IDLE
        self.leader = False
        self.reconnects = 0
        self.received = 0
        self.dropped = 0
        self.last_message_at: float | None = None
        #: time.monotonic() of the last message heard (0: none yet)
        self.last_message_at_monotonic = 0.0

    @property
    def state(self) -> str:
        """idle (not started in this process), connecting, up, down."""
        return self._state

    @state.setter
    def state(self, state: str) -> None:
        was, self._state = self._state, state
        if self.observer is not None and state != was:
            self.observer.bus_state(self.name, state == UP, reconnect=was == UP and state == DOWN)

    def start(self) -> None:
        """Listen in this process."""
        if self._runner is None:
            self.state = CONNECTING
            self._runner = gevent.spawn(self._run)

    def stop(self) -> None:
        """Stop listening and close the connection.

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
            except Exception as exc:  # every failure of a connection: log it (once an outage), reconnect
                if self._runner is not gevent.getcurrent():
                    return  # stopped: its connection was closed under it
                if self.state == UP or failures == 0:
                    log.warning("%s bus connection lost: %s; reconnecting", self.name, _describe(exc))
                    failures, self._down_since = 0, time.monotonic()
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

    #: when the connection was last lost (the outage's start, logged once)
    _down_since = 0.0

    def _up(self) -> None:
        """The backend is connected and caught up: say so (once per outage)."""
        was = self.state
        self.state = UP
        if was == DOWN and self._down_since:
            log.warning("%s bus connection back after %.1f s", self.name, time.monotonic() - self._down_since)
        else:
            log.info("%s bus listening", self.name)

    def _listen(self) -> None:
        """Connect, listen (calling ``_up``), and hand messages on until the connection is lost."""
        raise NotImplementedError

    def _close(self) -> None:
        """Close the listening connection, if any."""

    def _heard(self) -> None:
        self.received += 1
        self.last_message_at = time.time()
        self.last_message_at_monotonic = time.monotonic()
        if self.observer is not None:
            self.observer.bus_message(self.name)

    def stats(self) -> dict[str, Any]:
        """What an operator wants to know of this process's bus."""
        return {"backend": self.name, "state": self.state, "leader": self.leader,
                "reconnects": self.reconnects, "received": self.received, "dropped": self.dropped}

    def probe(self) -> float:
        """Readiness: 0 when connected (or not started in this process).

        :raise Unavailable: the bus is not connected in this process
        """
        if self.state in (CONNECTING, DOWN):
            raise Unavailable(f"the {self.name} bus is {self.state}")
        return 0.0


class LogListener(Listener):
    """A listener that reads the log from its cursor, and hears signals."""

    def __init__(self) -> None:
        super().__init__()
        #: the position of the last entry handed on; None until the log was first read
        self.cursor: int | None = None
        #: the log's epoch when it was last read (see the module docstring)
        self.epoch: str | None = None
        self.on_entry: Callable[[Entry], None] | None = None
        self.on_signal: Callable[[Signal], None] | None = None
        #: called when this worker may have missed entries (the log lost them)
        self.on_lost: Callable[[str], None] | None = None

    def _resumed(self, epoch: str, head: int, trimmed: int) -> int:
        """Where to read from now that the connection is back; the backend reads on from there."""
        if self.cursor is None:
            self.cursor = head  # first start: from now
        elif epoch != self.epoch:
            log.warning("the %s bus's log is new (epoch %s, was %s): what it held is gone", self.name, epoch,
                        self.epoch)
            self.cursor = START
            self._lost("the log was lost")
        elif trimmed > self.cursor:
            log.warning("the %s bus's log was trimmed past this worker's cursor while it was away", self.name)
            self.cursor = trimmed
            self._lost("entries were trimmed before this worker read them")
        self.epoch = epoch
        return self.cursor

    def _lost(self, why: str) -> None:
        if self.on_lost is not None:
            try:
                self.on_lost(why)
            except Exception:
                log.exception("handling a lost log failed")

    def _entry(self, position: int, text: str | bytes) -> None:
        """Hand on the entry at ``position`` unless it was already (never raises)."""
        if self.cursor is not None and position <= self.cursor:
            return
        self.cursor = position
        self._heard()
        try:
            entry = envelope.decode(text)
            if not isinstance(entry, envelope.Publication | envelope.Kick | envelope.Revoke | envelope.Member):
                raise ValueError("not a log entry")
        except ValueError as exc:
            self.dropped += 1
            log.warning("dropped an entry of the %s bus's log: %s", self.name, exc)
            return
        if self.on_entry is not None:
            try:
                self.on_entry(envelope.with_position(entry, position))
            except Exception:
                self.dropped += 1
                log.exception("handling an entry of the %s bus's log failed", self.name)

    def _signal(self, text: str | bytes) -> None:
        """Hand on a signal; garbage is counted and dropped."""
        self._heard()
        try:
            signal = envelope.decode(text)
            if not isinstance(signal, envelope.Hello | envelope.Ask | envelope.Answer):
                raise ValueError("not a signal")
        except ValueError as exc:
            self.dropped += 1
            log.warning("dropped a signal on the %s bus: %s", self.name, exc)
            return
        if self.on_signal is not None:
            try:
                self.on_signal(signal)
            except Exception:
                self.dropped += 1
                log.exception("handling a signal of the %s bus failed", self.name)

    def wait_for_cursor(self, timeout: float) -> int | None:
        """The cursor, waiting up to ``timeout`` seconds for the log's first read (a worker just started)."""
        deadline = time.monotonic() + timeout
        while self.cursor is None and self.state != IDLE and time.monotonic() < deadline:
            gevent.sleep(0.01)
        return self.cursor

    def caught_up(self, head: int, timeout: float) -> bool:
        """Wait until this worker has read the log through ``head``; False after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self.cursor is None or self.cursor < head:
            if time.monotonic() >= deadline:
                return False
            gevent.sleep(0.01)
        return True


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
