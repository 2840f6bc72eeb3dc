"""Room names: ``organization.<id>`` and ``user.<user_id>`` (README, "Connecting from a browser")."""

from __future__ import annotations

from app.auth.credentials import is_valid_organization_id, is_valid_user_id

#: event names Socket.IO reserves (socket.io-parser's RESERVED_EVENTS): no client sends them, none is published
RESERVED_EVENTS = frozenset(
    {"connect", "connect_error", "disconnect", "disconnecting", "newListener", "removeListener"}
)

ORGANIZATION_PREFIX = "organization."
USER_PREFIX = "user."


def organization_room(organization_id: str) -> str:
    """Return the room of an organization."""
    return ORGANIZATION_PREFIX + organization_id


def user_room(user_id: str) -> str:
    """Return the room of a user."""
    return USER_PREFIX + user_id


def is_valid_room(room: str) -> bool:
    """Tell whether ``room`` is an organization or user room with a valid id."""
    if room.startswith(ORGANIZATION_PREFIX):
        return is_valid_organization_id(room[len(ORGANIZATION_PREFIX):])
    if room.startswith(USER_PREFIX):
        return is_valid_user_id(room[len(USER_PREFIX):])
    return False
