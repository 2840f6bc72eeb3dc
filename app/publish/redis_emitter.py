"""The Socket.IO Redis emitter protocol -> Publisher (README, "The Socket.IO Redis emitters").

Understood exactly as Node's Redis adapter understands them:

- ``@socket.io/redis-emitter`` 5.x, ``socket.io-emitter`` 3.x and the
  ``ashiina/socket.io-php-emitter`` library: msgpack ``[uid, packet, opts]``
  on ``<prefix>#/#``, or on ``<prefix>#/#<room>#`` when one room is targeted.
  The PHP library publishes a multi-room emit once per room, with the full
  room list each time: the message on room R's channel goes to R's sockets
  that are in none of the rooms listed before R, so each socket gets the
  event exactly once.
- the original ``rase/socket.io-php-emitter``: ``[packet, opts]`` on
  ``<prefix>#emitter``.
- server-side requests on ``<prefix>-request#/#`` (JSON): ``disconnectSockets``
  (type 4) disconnects the sockets in its rooms; ``socketsJoin`` and
  ``socketsLeave`` (types 2, 3) are refused: they would put sockets in rooms
  they were not authorized for.
"""

from __future__ import annotations

import json
from typing import Any

import msgpack

from app.publish.emitters import Dropped, Drops, log, read_opts, read_packet
from app.publish.service import Publisher

SOURCE = "redis-emitter"
REMOTE_JOIN, REMOTE_LEAVE, REMOTE_DISCONNECT = 2, 3, 4


class RedisEmitterSource:
    """Decode what Socket.IO Redis emitters publish and hand it to the Publisher."""

    def __init__(self, publisher: Publisher, prefix: str) -> None:
        self._publisher = publisher
        self._broadcast = f"{prefix}#"
        self._legacy = f"{prefix}#emitter"
        self._request = f"{prefix}-request#"
        self.drops = Drops(SOURCE)

    def handle(self, channel: str, data: Any) -> None:
        """Deliver one message received on ``channel``; never raise."""
        self.drops.run(channel, lambda: self._handle(channel, bytes(data)))

    def _handle(self, channel: str, data: bytes) -> None:
        if channel == self._legacy:
            message = _unpack(data)
            if not isinstance(message, list) or len(message) != 2:
                raise Dropped("not [packet, opts]")
            self._emit(message[0], message[1], None)
        elif channel.startswith(self._request):
            self._server_request(channel[len(self._request):], data)
        elif channel.startswith(self._broadcast):
            namespace, _, tail = channel[len(self._broadcast):].partition("#")
            if namespace != "/":
                raise Dropped(f"namespace {namespace[:40]!r}: orgcast serves '/' only")
            room = tail[:-1] if tail.endswith("#") else None
            message = _unpack(data)
            if not isinstance(message, list) or len(message) != 3:
                raise Dropped("not [uid, packet, opts]")
            self._emit(message[1], message[2], room)
        else:
            raise Dropped("a channel orgcast does not read")

    def _emit(self, packet: Any, opts: Any, channel_room: str | None) -> None:
        args = read_packet(packet)
        rooms, except_rooms = read_opts(opts)
        if channel_room is not None and len(rooms) > 1 and channel_room in rooms:
            # Published once per room with the whole list: this copy is for
            # the sockets of channel_room that no earlier room reached.
            earlier = rooms[:rooms.index(channel_room)]
            rooms, except_rooms = [channel_room], except_rooms + earlier
        self._publisher.emit(rooms, except_rooms, args, SOURCE)

    def _server_request(self, namespace_part: str, data: bytes) -> None:
        if namespace_part.partition("#")[0] != "/":
            raise Dropped("a request for another namespace")
        try:
            request = json.loads(data)
        except (ValueError, RecursionError):
            raise Dropped("a request that is not JSON") from None
        if not isinstance(request, dict):
            raise Dropped("a request that is not an object")
        kind = request.get("type")
        if kind in (REMOTE_JOIN, REMOTE_LEAVE):
            raise Dropped("socketsJoin/socketsLeave refused: sockets join only rooms they are authorized for")
        if kind != REMOTE_DISCONNECT:
            raise Dropped(f"request type {str(kind)[:10]} is not supported")
        rooms, except_rooms = read_opts(request.get("opts"))
        if not rooms:
            raise Dropped("disconnectSockets without a room (every socket) is refused")
        self._publisher.disconnect_rooms(rooms, except_rooms, SOURCE)
        log.info("%s: disconnectSockets for %d rooms", SOURCE, len(rooms))


def _unpack(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.exceptions.ExtraData) as exc:
        raise Dropped(f"bytes that do not decode as msgpack ({type(exc).__name__})") from None
