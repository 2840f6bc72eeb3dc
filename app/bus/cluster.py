"""The workers of the deployment: who is alive, and questions asked of all of them.

Every worker (of every instance on the same bus) says ``Hello`` every
``HEARTBEAT`` seconds, and ``bye`` when it stops; a new worker asks the
others to answer its first hello, so that it knows them within a round trip.
A worker not heard from for ``DEAD_AFTER`` seconds is gone (SIGKILL,
SIGSTOP, a lost host): the ``on_gone`` callbacks run for it.

``ask`` publishes a question; every worker answers it on the bus from its
own state (the answerers registered with ``answer``), and the asker waits
for the workers it knows to be alive, at most ``timeout`` seconds. One that
does not answer in time is left out, and the result says ``partial``: a
stopped worker never makes the question hang.

Why not python-socketio's ``fetch_sockets``-style calls: orgcast's bus is
its own (``envelope.py`` says why), and these answers are summaries (counts
per user, per organization), not every socket.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import gevent
import gevent.event

from app.bus.envelope import Answer, Ask, Hello, Message, Signal
from app.errors import Unavailable

log = logging.getLogger(__name__)

HEARTBEAT = 2.0
#: seconds without a hello after which a worker is gone
DEAD_AFTER = 10.0


class Bus(Protocol):
    def signal(self, message: Signal) -> None: ...


@dataclass
class _Question:
    expected: set[str]
    asked_at: float
    answers: dict[str, Any] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)
    done: gevent.event.Event = field(default_factory=gevent.event.Event)


@dataclass(frozen=True)
class Answers:
    """What the workers answered to one question."""

    #: each worker's answer, by worker
    by_peer: dict[str, Any]
    #: a worker known to be alive did not answer in time
    partial: bool
    #: how long each answer took to come back over the bus (question, then answer)
    latency_ms: dict[str, float]


class Cluster:
    """This worker's view of the others, over the bus."""

    def __init__(self, bus: Bus, *, timeout: float, heartbeat: float = HEARTBEAT, dead_after: float = DEAD_AFTER,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._bus = bus
        self._timeout = timeout
        self._heartbeat = heartbeat
        self._dead_after = dead_after
        self._clock = clock
        #: this worker's name on the bus: host, pid, and a nonce (pids are reused)
        self.peer = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        #: the other workers heard from, with when
        self.peers: dict[str, float] = {}
        self._answerers: dict[str, Callable[[str], Any]] = {}
        self._questions: dict[str, _Question] = {}
        self._runner: gevent.Greenlet | None = None
        self._last_reply = 0.0
        #: called with the name of each worker found gone
        self.on_gone: list[Callable[[str], None]] = []
        #: called when another worker took this one for gone (it was stopped a while, then resumed)
        self.on_taken_for_gone: list[Callable[[], None]] = []
        self._stopping = False

    def answer(self, what: str, answerer: Callable[[str], Any]) -> None:
        """Answer questions ``what`` with ``answerer(arg)`` (JSON-able; runs in the listener)."""
        self._answerers[what] = answerer

    # --- life

    def start(self) -> None:
        if self._runner is None:
            self._runner = gevent.spawn(self._beat)

    def stop(self) -> None:
        """Say bye (best effort: the others would find out after DEAD_AFTER)."""
        self._stopping = True
        if self._runner is not None:
            self._runner.kill(block=False)
            self._runner = None
        try:
            self._bus.signal(Hello(self.peer, bye=True))
        except Unavailable:
            pass

    def _beat(self) -> None:
        first = True
        while True:
            try:
                self._bus.signal(Hello(self.peer, reply=first))
                first = False
            except Unavailable:
                pass  # the bus is down: nobody hears anyone; try again
            self._expire()
            # Until the first hello is out (the listener connecting), try often.
            gevent.sleep(min(0.1, self._heartbeat) if first else self._heartbeat)

    def _expire(self) -> None:
        now = self._clock()
        for peer in [p for p, seen in self.peers.items() if now - seen > self._dead_after]:
            log.warning("worker %s not heard from for %.0f s: gone", peer, now - self.peers[peer])
            self._gone(peer, tell=True)

    def _gone(self, peer: str, tell: bool = False) -> None:
        self.peers.pop(peer, None)
        if tell and not self._stopping:
            # Tell it, should it only be stopped: it hears this when it resumes.
            try:
                self._bus.signal(Hello(peer, bye=True))
            except Unavailable:
                pass
        for question in self._questions.values():
            question.expected.discard(peer)
            if question.expected <= question.answers.keys():
                question.done.set()
        for callback in self.on_gone:
            try:
                callback(peer)
            except Exception:
                log.exception("handling the end of worker %s failed", peer)

    def alive(self) -> list[str]:
        """Every worker heard from within DEAD_AFTER, this one included."""
        now = self._clock()
        return sorted({self.peer, *(p for p, seen in self.peers.items() if now - seen <= self._dead_after)})

    # --- messages (from the bus listener)

    def handle(self, message: Message) -> None:
        if isinstance(message, Hello):
            self._hello(message)
        elif isinstance(message, Ask):
            self._ask(message)
        elif isinstance(message, Answer):
            self._answer(message)

    def _hello(self, hello: Hello) -> None:
        if hello.peer == self.peer:
            if hello.bye and not self._stopping:
                log.warning("another worker took this one for gone: saying hello again")
                try:
                    self._bus.signal(Hello(self.peer))
                except Unavailable:
                    pass
                for callback in self.on_taken_for_gone:
                    callback()
            return
        if hello.bye:
            if hello.peer in self.peers:
                log.info("worker %s left", hello.peer)
                self._gone(hello.peer)
            return
        known = hello.peer in self.peers
        self.peers[hello.peer] = self._clock()
        if not known:
            log.debug("worker %s joined", hello.peer)
        if hello.reply and self._clock() - self._last_reply > 0.2:
            self._last_reply = self._clock()
            try:
                self._bus.signal(Hello(self.peer))
            except Unavailable:
                pass

    def _ask(self, ask: Ask) -> None:
        if ask.peer != self.peer and ask.peer not in self.peers:
            self.peers[ask.peer] = self._clock()  # it is alive: it just asked
        answerer = self._answerers.get(ask.what)
        if answerer is None:
            return
        try:
            data = answerer(ask.arg)
        except Exception:
            log.exception("answering %s failed", ask.what)
            return
        try:
            self._bus.signal(Answer(ask.id, self.peer, ask.peer, data))
        except Unavailable as exc:
            log.warning("could not answer %s: %s", ask.what, exc.message)

    def _answer(self, answer: Answer) -> None:
        if answer.peer != self.peer:
            self.peers[answer.peer] = self._clock()  # it is alive: it just answered
        if answer.to != self.peer:
            return
        question = self._questions.get(answer.id)
        if question is None:
            return  # too late: the asker went on without it
        question.answers[answer.peer] = answer.data
        question.latency_ms[answer.peer] = round((self._clock() - question.asked_at) * 1000, 2)
        if question.expected <= question.answers.keys():
            question.done.set()

    # --- asking

    def ask(self, what: str, arg: str = "") -> Answers:
        """Ask every live worker, and wait for their answers (at most the timeout).

        :raise Unavailable: the bus did not take the question
        """
        question = _Question(set(self.alive()), self._clock())
        qid = secrets.token_hex(8)
        self._questions[qid] = question
        try:
            self._bus.signal(Ask(qid, self.peer, what, arg))
            question.done.wait(self._timeout)
        finally:
            self._questions.pop(qid, None)
        partial = not question.expected <= question.answers.keys()
        if partial:
            log.info("%s: no answer from %s within %.1f s", what,
                     ", ".join(sorted(question.expected - question.answers.keys())), self._timeout)
        return Answers(dict(question.answers), partial, dict(question.latency_ms))
