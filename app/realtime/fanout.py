"""Publish -> bytes on sockets: the only place that writes events to sockets.

Everything that delivers (the HTTP API, pg_notify, the Redis emitter) goes
through ``Publisher``, which calls this module. A faster broadcast path
replaces the body of ``emit`` without touching HTTP or auth code.
"""

from __future__ import annotations

from typing import Any

import socketio

NAMESPACE = "/"


class Fanout:
    """Deliver events to the sockets in a room of this process's server."""

    def __init__(self, sio: socketio.Server) -> None:
        self._sio = sio

    def emit(self, room: str, event: str, data: Any) -> int:
        """Send ``event`` with ``data`` to every socket in ``room``; return how many."""
        # python-socketio encodes the packet once and reuses it per recipient.
        # A 1-tuple is "exactly one argument": given None, emit() would send
        # ["news"] (no argument) where Node's Socket.IO sends ["news",null].
        recipients = self.room_size(room)
        if recipients:
            self._sio.emit(event, (data,), to=room, namespace=NAMESPACE)
        return recipients

    def disconnect_room(self, room: str) -> int:
        """Disconnect every socket in ``room``; return how many."""
        sids = [sid for sid, _ in self._sio.manager.get_participants(NAMESPACE, room)]
        for sid in sids:
            self._sio.disconnect(sid, namespace=NAMESPACE)
        return len(sids)

    def room_size(self, room: str) -> int:
        """Return how many sockets of this process are in ``room``."""
        rooms = self._sio.manager.rooms.get(NAMESPACE, {})
        members = rooms.get(room)
        return len(members) if members else 0
