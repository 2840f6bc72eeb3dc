"""``RoomsManager`` (``app/transport/server.py``) against python-socketio's own ``Manager``: the same
random enters, leaves and disconnects leave both with the same rooms and members, and each
socket's rooms as the stock manager finds them by scanning every room (the index only makes
that O(the socket's rooms))."""

from __future__ import annotations

import random

import socketio

from app.transport.server import RoomsManager

NAMESPACES = ("/", "/other")


def rooms_of(manager: socketio.Manager) -> dict[str, dict[object, dict[str, str]]]:
    return {ns: {room: dict(members) for room, members in rooms.items() if members}
            for ns, rooms in manager.rooms.items()}


def test_random_enters_leaves_and_disconnects_match_python_socketio() -> None:
    rng = random.Random(18)
    ours, stock = RoomsManager(), socketio.Manager()
    connected: dict[str, set[str]] = {ns: set() for ns in NAMESPACES}
    for step in range(3000):
        ns = rng.choice(NAMESPACES)
        action = rng.random()
        if action < 0.25 or not connected[ns]:
            sid = f"s{step}"
            for manager in (ours, stock):  # what pre_connect does, with a known sid
                manager.basic_enter_room(sid, ns, None, eio_sid=f"e{step}")
                manager.basic_enter_room(sid, ns, sid, eio_sid=f"e{step}")
            connected[ns].add(sid)
            continue
        sid = rng.choice(sorted(connected[ns]))
        room = f"organization.{rng.randrange(12)}"
        if action < 0.6:
            for manager in (ours, stock):
                manager.basic_enter_room(sid, ns, room)
        elif action < 0.85:
            for manager in (ours, stock):
                manager.basic_leave_room(sid, ns, room)
        else:
            for manager in (ours, stock):
                manager.basic_disconnect(sid, ns)
            connected[ns].discard(sid)
        if step % 100 == 0:
            assert rooms_of(ours) == rooms_of(stock), step
    assert rooms_of(ours) == rooms_of(stock)
    for ns in NAMESPACES:
        for sid in connected[ns]:
            assert sorted(map(str, ours.get_rooms(sid, ns))) == sorted(map(str, stock.get_rooms(sid, ns))), sid
    # Nothing is left in the index of the sockets that are gone.
    assert {sid for ns in NAMESPACES for sid in ours._rooms_of.get(ns, {})} <= set().union(*connected.values())
