"""The replay/live interleaving of a recovering socket, forced step by step (``realtime/fanout.py``).

The real Fanout over fake sockets: events published while a socket's
history is read wait at its gate, then follow what it missed; a client
ahead of this worker (its offset past the worker's cursor) gets nothing it
has twice. No sleeps: each step is a call.
"""

from __future__ import annotations

import json
from typing import Any

from app.bus.envelope import Publication
from app.realtime.fanout import Fanout


class FakeSocket:
    def __init__(self) -> None:
        self.ws = None
        self.upgrading = False
        self.closed = False
        self.gate: Any = None
        self.sent: list[str] = []

    def send(self, pkt: Any) -> None:
        self.sent.append(pkt.data)


class FakeManager:
    def __init__(self, rooms: dict[str, dict[str, str]]) -> None:
        self.rooms = {"/": rooms}

    def eio_sid_from_sid(self, sid: str, namespace: str) -> str | None:
        return {"s1": "e1", "s2": "e2"}.get(sid)


class FakeServer:
    def __init__(self) -> None:
        self.sockets = {"e1": FakeSocket(), "e2": FakeSocket()}
        self.eio = type("Eio", (), {"sockets": self.sockets})()
        self.manager = FakeManager({"organization.a": {"s1": "e1", "s2": "e2"}})


def setup() -> tuple[Fanout, FakeServer, list[int]]:
    server = FakeServer()
    cursor = [0]
    fanout = Fanout(server, offsets=True)  # type: ignore[arg-type]
    fanout.cursor = lambda: cursor[0]
    return fanout, server, cursor


def live(fanout: Fanout, cursor: list[int], position: int) -> None:
    fanout.deliver(Publication(("organization.a",), json.dumps(["news", position]), position=position))
    cursor[0] = position


def numbers(sock: FakeSocket) -> list[int]:
    return [json.loads(text[1:])[1] for text in sock.sent]


def test_what_is_published_during_the_replay_follows_it_once_in_order() -> None:
    fanout, server, cursor = setup()
    for position in (1, 2, 3):
        live(fanout, cursor, position)
    through = fanout.hold("s1")
    assert through == 3
    live(fanout, cursor, 4)  # arrives while the history is read
    live(fanout, cursor, 5)
    missed = [(2, json.dumps(["news", 2])), (3, json.dumps(["news", 3]))]  # (offset 1, through 3]
    server.sockets["e1"].sent.clear()
    fanout.release("s1", missed, floor=1)
    live(fanout, cursor, 6)
    assert numbers(server.sockets["e1"]) == [2, 3, 4, 5, 6]
    assert numbers(server.sockets["e2"]) == [1, 2, 3, 4, 5, 6]  # the others never waited
    assert server.sockets["e1"].gate is None


def test_a_client_ahead_of_this_worker_gets_nothing_twice() -> None:
    fanout, server, cursor = setup()
    live(fanout, cursor, 1)
    through = fanout.hold("s1")
    assert through == 1
    live(fanout, cursor, 2)  # held
    server.sockets["e1"].sent.clear()
    # It comes from a worker that had delivered through 4: it has 2, 3 and 4 already.
    fanout.release("s1", [], floor=4)
    assert numbers(server.sockets["e1"]) == []
    for position in (3, 4, 5, 6):
        live(fanout, cursor, position)
    assert numbers(server.sockets["e1"]) == [5, 6]
    assert server.sockets["e1"].gate is None


def test_each_event_carries_its_position_as_its_offset() -> None:
    fanout, server, cursor = setup()
    live(fanout, cursor, 7)
    assert json.loads(server.sockets["e2"].sent[0][1:]) == ["news", 7, "7"]
