"""Publisher: the one path every event takes, whatever its source.

The HTTP API, pg_notify and the Redis emitter each decode their own format,
then call ``publish``: validation and the emit live here, once. A service:
it imports neither Flask nor Socket.IO; the fan-out comes in through the
constructor.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from app.auth.credentials import is_valid_organization_id, is_valid_user_id
from app.errors import ApiError
from app.realtime.rooms import is_valid_room, organization_room, user_room

log = logging.getLogger(__name__)

#: Event names Socket.IO clients reserve for themselves (README, "Publishing over HTTP").
RESERVED_EVENTS = frozenset(
    {"connect", "connect_error", "disconnect", "disconnecting", "newListener", "removeListener"}
)


class Fanout(Protocol):
    def emit(self, room: str, event: str, data: Any) -> int: ...
    def disconnect_room(self, room: str) -> int: ...


def is_valid_event(event: Any) -> bool:
    """Tell whether ``event`` is 1-64 printable characters and not reserved."""
    return (isinstance(event, str) and 0 < len(event) <= 64 and event.isprintable()
            and event not in RESERVED_EVENTS)


class Publisher:
    """Validate, then deliver events and disconnects to rooms."""

    def __init__(self, fanout: Fanout,
                 on_user_disconnected: Callable[[str], None] | None = None) -> None:
        self._fanout = fanout
        self._on_user_disconnected = on_user_disconnected

    def publish(self, room: str, event: Any, data: Any, source: str) -> int:
        """Deliver ``event`` to ``room``; return the local recipients.

        :raise ApiError: invalid_room, invalid_event
        """
        if not isinstance(room, str) or not is_valid_room(room):
            raise ApiError("invalid_room")
        if not is_valid_event(event):
            raise ApiError("invalid_event")
        delivered = self._fanout.emit(room, event, data)
        log.debug("%s: %r to %s (%d local sockets)", source, event, room, delivered)
        return delivered

    def publish_to_organization(self, organization_id: str, event: Any, data: Any,
                                source: str) -> str:
        """Deliver to ``organization.<id>``; return the room.

        :raise ApiError: invalid_organization, invalid_event
        """
        if not is_valid_organization_id(organization_id):
            raise ApiError("invalid_organization")
        room = organization_room(organization_id)
        self.publish(room, event, data, source)
        return room

    def publish_to_user(self, user_id: str, event: Any, data: Any, source: str) -> str:
        """Deliver to ``user.<user_id>``; return the room.

        :raise ApiError: invalid_user, invalid_event
        """
        if not is_valid_user_id(user_id):
            raise ApiError("invalid_user")
        room = user_room(user_id)
        self.publish(room, event, data, source)
        return room

    def disconnect_user(self, user_id: str, source: str) -> int:
        """Disconnect every socket of the user; return how many were local.

        :raise ApiError: invalid_user
        """
        if not is_valid_user_id(user_id):
            raise ApiError("invalid_user")
        if self._on_user_disconnected is not None:
            self._on_user_disconnected(user_id)
        count = self._fanout.disconnect_room(user_room(user_id))
        log.info("%s: disconnected user %s (%d local sockets)", source, user_id, count)
        return count
