"""Bus messages -> bytes on this process's sockets: the only place that writes events.

Every worker's bus listener hands each message here. A publication's packet
is encoded once and framed once; the same frame is written to every
WebSocket recipient (server frames are not masked, so it is the same bytes
for all), and the same packet object, encoded once, is queued for polling
ones. Rooms are python-socketio's.

With recovery on, the publication's log position is the packet's last
argument (its *offset*) — the same for every recipient, so the frame is
still built once.

Exactly once, in order: entries come here in log order, so a socket that
has been in a room since position L receives every event of it after L, in
order, once. A socket whose history is being read — recovery — has a
*gate*: what arrives for it waits (``hold``) until what it missed, read
from the history through L, has been sent; then what waited follows
(``release``). A client that comes back from a worker that was ahead of
this one (its offset past L) gets a floor: nothing at or below what it
already has is sent again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from engineio import packet as eio_packet

from app.bus.envelope import Kick, Member, Message, Publication, Revoke
from app.rooms import ORGANIZATION_PREFIX
from app.transport.server import NAMESPACE, SocketServer
from app.transport.websocket import encode_frame

log = logging.getLogger(__name__)
_first_value = json.JSONDecoder().raw_decode


class Observer(Protocol):
    """Told how many deliveries each publication made here (the metrics implement it)."""

    def delivered(self, count: int, dropped: int = 0) -> None: ...


def event_name(args: str) -> str:
    """The event name of ``[event, ...]`` JSON text, for the logs (its first value only is parsed)."""
    try:
        name = _first_value(args, 1)[0]
    except ValueError:
        return "?"
    return name[:64] if isinstance(name, str) else "?"


def _packet_text(args: str, offset: int | None) -> str:
    """The Socket.IO EVENT packet on "/": ``2[event, ...args]``, the offset appended when there is one."""
    if offset is None:
        return "2" + args
    return "2" + args[:-1] + ',"' + str(offset) + '"]'


class Gate:
    """What keeps a socket's events in order and once while its history is read."""

    __slots__ = ("held", "floor")

    def __init__(self, floor: int = 0) -> None:
        #: (position, packet text) that arrived while the history was read; None once released
        self.held: list[tuple[int, str]] | None = []
        #: positions at or below this one are not sent (the client has them)
        self.floor = floor


class Fanout:
    """Deliver publications and kicks to the sockets of this process."""

    def __init__(self, sio: SocketServer, on_forget: Callable[[str], None] | None = None,
                 observer: Observer | None = None, offsets: bool = True) -> None:
        self._sio = sio
        self._on_forget = on_forget
        self._observer = observer
        #: append each event's position as its last argument (connection state recovery)
        self.offsets = offsets
        self.delivered = 0
        #: the position through which the log has been delivered here (set by the bus listener)
        self.cursor: Callable[[], int | None] = lambda: None
        #: told of each member change of the deployment, in log order (the webhooks)
        self.on_member: Callable[[Member], None] | None = None
        #: told (organization, user, code) of each revocation, in log order (the namespace)
        self.on_revoke: Callable[[str, str, str], None] | None = None
        #: the same, waiting up to the given seconds for the log's first read
        self.first_cursor: Callable[[float], int | None] = lambda timeout: self.cursor()

    def handle(self, message: Message) -> None:
        """Act on one entry of the log (in log order)."""
        if isinstance(message, Publication):
            self.deliver(message)
        elif isinstance(message, Kick):
            self.kick(message)
        elif isinstance(message, Revoke) and self.on_revoke is not None:
            self.on_revoke(message.organization_id, message.user_id, message.code)
        elif isinstance(message, Member) and self.on_member is not None:
            self.on_member(message)

    def deliver(self, publication: Publication) -> int:
        """Write a publication to every local socket it is for; return how many."""
        position = publication.position
        offset = position if self.offsets else None
        recipients = self._recipients(publication.rooms, publication.except_rooms)
        if not recipients:
            self._delivered(publication, 0, 0)
            return 0
        text = _packet_text(publication.args, offset)
        pkt = eio_packet.Packet(eio_packet.MESSAGE, text)
        frame = encode_frame(("4" + text).encode())
        sockets = self._sio.eio.sockets
        count = dropped = 0
        for eio_sid in recipients:
            sock = sockets.get(eio_sid)
            if sock is None or sock.closed:
                dropped += 1
                continue
            gate = sock.gate
            if gate is not None:
                if gate.held is not None:
                    gate.held.append((position, text))
                    count += 1
                    continue
                if position <= gate.floor:
                    continue  # the client has it already
                sock.gate = None
            ws = sock.ws
            if ws is not None and not sock.upgrading:
                ws.send_frame_bytes(frame)
            else:
                sock.send(pkt)
            count += 1
        self.delivered += count
        self._delivered(publication, count, dropped)
        return count

    def _delivered(self, publication: Publication, count: int, dropped: int) -> None:
        if self._observer is not None:
            self._observer.delivered(count, dropped)
        if log.isEnabledFor(logging.INFO):
            log.info("delivered %s [%s] from %s to %s: %d sockets", event_name(publication.args),
                     publication.id or "-", publication.source or "-", ",".join(publication.rooms) or "everyone",
                     count, extra={"request_id": publication.id, "event": event_name(publication.args),
                                   "source": publication.source, "rooms": list(publication.rooms),
                                   "recipients": count})

    def hold(self, sid: str) -> int | None:
        """Keep what is published for socket ``sid`` until ``release``; return the position delivered through.

        Everything at or before the returned position has been delivered to
        the sockets of this worker; everything after it waits for ``release``.
        """
        sock = self._session(sid)
        if sock is not None:
            old = sock.gate
            sock.gate = Gate(old.floor if old is not None else 0)  # (a floor it had stays)
        return self.cursor()

    def release(self, sid: str, missed: list[tuple[int, str]], floor: int = 0, tag: int | None = None) -> None:
        """Send ``missed`` (position, args), then what was held for ``sid`` after ``floor``.

        ``tag``: the offset the ``missed`` events carry instead of their own
        positions — a rewind sends older events of a room, and the client's
        offset must stay where its other rooms are (``hold``'s position).
        """
        sock = self._session(sid)
        if sock is None:
            return
        gate = sock.gate
        held = gate.held or [] if gate is not None else []
        if gate is not None:
            floor = max(floor, gate.floor)
        for position, args in missed:
            offset = (position if tag is None else max(tag, floor)) if self.offsets else None
            sock.send(eio_packet.Packet(eio_packet.MESSAGE, _packet_text(args, offset)))
        for position, text in held:
            if position > floor:
                sock.send(eio_packet.Packet(eio_packet.MESSAGE, text))
        self.delivered += len(missed)  # (the held ones were counted as they came)
        now = self.cursor() or 0
        if floor > now:
            # The client came from a worker that was ahead: skip what it has until this one catches up.
            sock.gate = Gate(floor)
            sock.gate.held = None
        else:
            sock.gate = None

    def _session(self, sid: str) -> Any:
        eio_sid = self._sio.manager.eio_sid_from_sid(sid, NAMESPACE)
        sock = self._sio.eio.sockets.get(eio_sid) if eio_sid is not None else None
        return None if sock is None or sock.closed else sock

    def to_socket(self, sid: str, args: str) -> bool:
        """Send one event (``args``: the JSON of ``[event, data]``) to one local socket."""
        sock = self._session(sid)
        if sock is None:
            return False
        sock.send(eio_packet.Packet(eio_packet.MESSAGE, "2" + args))
        return True

    def kick(self, kick: Kick) -> int:
        """Disconnect the local sockets of a kick, and forget its users' acceptances."""
        if self._on_forget is not None:
            for user_id in kick.forget:
                self._on_forget(user_id)
        sids = self._sids(kick.rooms, kick.except_rooms)
        for sid in sids:
            self._sio.disconnect(sid, namespace=NAMESPACE)
        if sids:
            log.info("disconnected %d local sockets", len(sids))
        return len(sids)

    def organization_sizes(self) -> dict[str, int]:
        """Sockets of this process in each organization's room, by organization id."""
        rooms: dict[Any, Any] = self._sio.manager.rooms.get(NAMESPACE, {})
        return {room[len(ORGANIZATION_PREFIX):]: len(members) for room, members in rooms.items()
                if isinstance(room, str) and room.startswith(ORGANIZATION_PREFIX) and members}

    def members(self, room: str) -> list[str]:
        """The sids of this process's sockets in ``room``."""
        return list(self._sio.manager.rooms.get(NAMESPACE, {}).get(room, ()))

    def room_size(self, room: str) -> int:
        """Return how many sockets of this process are in ``room``."""
        members = self._sio.manager.rooms.get(NAMESPACE, {}).get(room)
        return len(members) if members else 0

    # --- rooms

    def _recipients(self, rooms: tuple[str, ...], except_rooms: tuple[str, ...]) -> Iterable[str]:
        """Engine.IO session ids of the sockets in any of ``rooms``, none of ``except_rooms``, once each."""
        namespace: dict[Any, Any] = self._sio.manager.rooms.get(NAMESPACE, {})
        if not rooms:
            # Every admitted socket (the emitters' "everyone", when allowed).
            everyone = namespace.get(None, {})
            members: Iterable[tuple[str, str]] = [
                (sid, eio) for sid, eio in everyone.items() if self._sio.manager.is_connected(sid, NAMESPACE)]
            return self._exclude(dict(members), namespace, except_rooms)
        if len(rooms) == 1 and not except_rooms:
            only = namespace.get(rooms[0])
            # A snapshot: a write that fails disconnects, which edits the room.
            return list(only.values()) if only else []
        chosen: dict[str, str] = {}
        for room in rooms:
            chosen.update(namespace.get(room, {}))
        return self._exclude(chosen, namespace, except_rooms)

    @staticmethod
    def _exclude(chosen: dict[str, str], namespace: dict[Any, Any], except_rooms: tuple[str, ...]) -> list[str]:
        for room in except_rooms:
            for sid in namespace.get(room, ()):
                chosen.pop(sid, None)
        return list(chosen.values())

    def _sids(self, rooms: tuple[str, ...], except_rooms: tuple[str, ...]) -> list[str]:
        namespace: dict[Any, Any] = self._sio.manager.rooms.get(NAMESPACE, {})
        chosen: dict[str, str] = {}
        for room in rooms:
            chosen.update(namespace.get(room, {}))
        for room in except_rooms:
            for sid in namespace.get(room, ()):
                chosen.pop(sid, None)
        return list(chosen)
