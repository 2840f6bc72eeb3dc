"""Publishing from SQL -> Publisher (README, "Publishing from SQL").

Two formats arrive by NOTIFY, in the leader process:

- ``pg_notify('orgcast', '{"room": "organization.42", "event": "news", "data": …}')``,
  delivered when the publisher's transaction commits (never on rollback:
  Postgres sends notifications at commit);
- ``@socket.io/postgres-emitter`` messages on ``<prefix>#/``:
  ``{uid, type, nsp?, data: {packet, opts}}`` (a missing ``nsp`` is ``/``),
  or, for payloads over 8,000 bytes, ``{uid, type, attachmentId}`` with the
  msgpack message in ``socket_io_attachments``. ``type`` 3 broadcasts, 6
  disconnects sockets; 4 and 5 (socketsJoin/Leave) are refused; the
  heartbeats of Node servers sharing the channel are ignored.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import msgpack

from app.publish.emitters import Dropped, Drops, read_opts, read_packet
from app.publish.service import Publisher

CHANNEL = "orgcast"
SOURCE = "pg-notify"
EMITTER_SOURCE = "postgres-emitter"
HEARTBEATS = (1, 2)
BROADCAST, SOCKETS_JOIN, SOCKETS_LEAVE, DISCONNECT_SOCKETS = 3, 4, 5, 6

FetchAttachment = Callable[[str, Any], bytes | None]


class PostgresSource:
    """Decode what backends NOTIFY and hand it to the Publisher."""

    def __init__(self, publisher: Publisher, emitter_channel: str, attachments_table: str,
                 fetch_attachment: FetchAttachment) -> None:
        self._publisher = publisher
        self.emitter_channel = emitter_channel
        self._table = attachments_table
        self._fetch = fetch_attachment
        self.drops = Drops(SOURCE)

    @property
    def channels(self) -> tuple[str, ...]:
        """The channels the leader listens to."""
        return (CHANNEL, self.emitter_channel)

    def handle(self, channel: str, payload: str) -> None:
        """Deliver one notification; never raise."""
        if channel == CHANNEL:
            self.drops.run(channel, lambda: self._orgcast(payload))
        elif channel == self.emitter_channel:
            self.drops.run(channel, lambda: self._emitter(payload))

    def _orgcast(self, payload: str) -> None:
        body = _json(payload)
        if not isinstance(body, dict) or "room" not in body or "event" not in body:
            raise Dropped('expected {"room": …, "event": …, "data": …}')
        self._publisher.publish(body["room"], body["event"], body.get("data"), SOURCE, key=body.get("idempotencyKey"))

    def _emitter(self, payload: str) -> None:
        document = _json(payload)
        if not isinstance(document, dict):
            raise Dropped("not an object")
        if "attachmentId" in document:
            raw = self._fetch(self._table, document["attachmentId"])
            if raw is None:
                raise Dropped(f"attachment {str(document['attachmentId'])[:20]} not found")
            try:
                document = msgpack.unpackb(raw, raw=False, strict_map_key=False)
            except (ValueError, TypeError, msgpack.exceptions.ExtraData):
                raise Dropped("an attachment that does not decode as msgpack") from None
            if not isinstance(document, dict):
                raise Dropped("an attachment that is not a map")
        if document.get("nsp", "/") != "/":
            raise Dropped("another namespace")
        kind = document.get("type")
        data = document.get("data")
        if kind in HEARTBEATS:
            return  # a Node server's heartbeat on the shared channel
        if kind in (SOCKETS_JOIN, SOCKETS_LEAVE):
            raise Dropped("socketsJoin/socketsLeave refused: sockets join only rooms they are authorized for")
        if not isinstance(data, dict):
            raise Dropped(f"type {str(kind)[:10]} without data")
        if kind == BROADCAST:
            rooms, except_rooms = read_opts(data.get("opts"))
            self._publisher.emit(rooms, except_rooms, read_packet(data.get("packet")), EMITTER_SOURCE)
        elif kind == DISCONNECT_SOCKETS:
            rooms, except_rooms = read_opts(data.get("opts"))
            if not rooms:
                raise Dropped("disconnectSockets without a room (every socket) is refused")
            self._publisher.disconnect_rooms(rooms, except_rooms, EMITTER_SOURCE)
        else:
            raise Dropped(f"message type {str(kind)[:10]} is not supported")


def _json(payload: str) -> Any:
    try:
        return json.loads(payload)
    except (ValueError, RecursionError):
        raise Dropped("not JSON") from None
