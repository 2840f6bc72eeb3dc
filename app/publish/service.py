"""Publisher: the one path every event takes, whatever its source.

The HTTP API, ``pg_notify`` and the Socket.IO emitters each decode their
own format, then call one method here: validation, encoding and the
append to the bus's log live here, once. Every worker and host reads the
log and delivers each publication to its own sockets; a publish that
returns has been appended (a ``202``), one the log did not take raises
``Unavailable`` (a ``503``).

A service: it imports neither Flask, Socket.IO nor a driver; the bus comes
in through the constructor.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from app import process
from app.auth.credentials import is_valid_organization_id, is_valid_user_id
from app.bus.envelope import Entry, Kick, Publication, Revoke
from app.errors import ApiError
from app.rooms import RESERVED_EVENTS, USER_PREFIX, is_valid_room, organization_room, user_room

log = logging.getLogger(__name__)



class Log(Protocol):
    def append(self, entry: Entry, key: str | None = None) -> int | None: ...


class Observer(Protocol):
    """Told of every event published (the metrics implement it)."""

    def published(self, source: str, count: int = 1) -> None: ...


def new_id() -> str:
    """A publication's id, for the log lines of every worker that delivers it."""
    return process.random_bytes(8).hex()  # secrets.token_hex(8), read ahead


_KEY = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def idempotency_key(value: Any) -> str | None:
    """A publish's idempotency key (None: none given).

    :raise ApiError: invalid_idempotency_key (not 1-64 of ``A-Za-z0-9._:-``)
    """
    if value is None or value == "":
        return None
    if not isinstance(value, str) or _KEY.fullmatch(value) is None:
        raise ApiError("invalid_idempotency_key")
    return value


def is_valid_event(event: Any) -> bool:
    """Tell whether ``event`` is 1-64 printable characters and not reserved."""
    return (isinstance(event, str) and 0 < len(event) <= 64 and event.isprintable()
            and event not in RESERVED_EVENTS)


def encode_args(args: Sequence[Any]) -> str:
    """Return the JSON text of Socket.IO event arguments ``[event, data, ...]``.

    :raise ApiError: bad_request (not JSON: nested too deeply, NaN, bytes)
    """
    try:
        text = json.dumps(list(args), separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            # A lone surrogate ("\ud800" in the body): valid JSON, not UTF-8. Escaped, the
            # client parses the same value (issue 17: it was a 500 and a traceback).
            text = json.dumps(list(args), separators=(",", ":"), ensure_ascii=True, allow_nan=False)
        return text
    except (ValueError, TypeError, RecursionError):
        raise ApiError("bad_request", "The data cannot be sent as JSON.") from None


@dataclass(frozen=True)
class Event:
    """One validated event of a batch: its room and encoded arguments."""

    room: str
    args: str
    #: the publisher's idempotency key (a repeat within ORGCAST_IDEMPOTENCY_WINDOW is not delivered)
    key: str | None = None


class Publisher:
    """Validate, encode, then publish events and disconnects on the bus."""

    def __init__(self, log: Log, *, broadcast_everyone: bool = False, observer: Observer | None = None) -> None:
        self._log = log
        self._broadcast_everyone = broadcast_everyone
        self._observer = observer

    # --- events

    def prepare(self, room: Any, event: Any, data: Any, key: Any = None) -> Event:
        """Validate one event for one room (and its idempotency key) and encode it.

        :raise ApiError: invalid_room, invalid_event, invalid_idempotency_key, bad_request
        """
        if not isinstance(room, str) or not is_valid_room(room):
            raise ApiError("invalid_room")
        if not is_valid_event(event):
            raise ApiError("invalid_event")
        return Event(room, encode_args([event, data]), idempotency_key(key))

    def publish(self, room: Any, event: Any, data: Any, source: str, request_id: str = "", key: Any = None) -> bool:
        """Deliver ``event`` with ``data`` (one argument) to ``room`` everywhere; False: a repeat of ``key``.

        :raise ApiError: invalid_room, invalid_event, invalid_idempotency_key, bad_request
        :raise Unavailable: the log did not take it
        """
        return self.send(self.prepare(room, event, data, key), source, request_id)

    def send(self, event: Event, source: str, request_id: str = "") -> bool:
        """Publish an event that ``prepare`` validated (``request_id``: its id in the logs; made up if empty).

        Return False when its key was accepted for its room within the window
        (the check and the append are one step of the log): delivered to no one.

        :raise Unavailable: the log did not take it
        """
        return self._send(Publication((event.room,), event.args, source=source, id=request_id or new_id()),
                          event.key)

    def _send(self, publication: Publication, key: str | None = None) -> bool:
        if self._log.append(publication, key) is None:
            log.info("%s: %s is a repeat of key %s for %s: not delivered", publication.source, publication.id, key,
                     publication.rooms[0])
            return False
        if self._observer is not None:
            self._observer.published(publication.source)
        log.debug("%s: published %s to %s", publication.source, publication.id, ",".join(publication.rooms))
        return True

    def publish_many(self, events: Iterable[Event], source: str, request_id: str = "") -> tuple[int, int]:
        """Publish events that were all validated first; return (how many, how many of them were repeats).

        Their ids in the logs are ``<request_id>-<n>``.

        :raise Unavailable: the log did not take one (those before it were appended)
        """
        request_id = request_id or new_id()
        count = repeats = 0
        for event in events:
            if not self.send(event, source, f"{request_id}-{count}"):
                repeats += 1
            count += 1
        return count, repeats

    def publish_to_organization(self, organization_id: str, event: Any, data: Any, source: str,
                                request_id: str = "", key: Any = None) -> tuple[str, bool]:
        """Deliver to ``organization.<id>``; return (the room, whether it was a repeat of ``key``).

        :raise ApiError: invalid_organization, invalid_event, invalid_idempotency_key, bad_request
        :raise Unavailable: the log did not take it
        """
        room = self.organization_room(organization_id)
        return room, not self.publish(room, event, data, source, request_id, key)

    def publish_to_user(self, user_id: str, event: Any, data: Any, source: str, request_id: str = "",
                        key: Any = None) -> tuple[str, bool]:
        """Deliver to ``user.<user_id>``; return (the room, whether it was a repeat of ``key``).

        :raise ApiError: invalid_user, invalid_event, invalid_idempotency_key, bad_request
        :raise Unavailable: the log did not take it
        """
        room = self.user_room(user_id)
        return room, not self.publish(room, event, data, source, request_id, key)

    def emit(self, rooms: Sequence[str], except_rooms: Sequence[str], args: Sequence[Any],
             source: str) -> None:
        """Deliver Socket.IO event arguments ``[event, ...]`` to the union of ``rooms``.

        The emitters' form: several rooms (each socket gets the event once),
        rooms to leave out, any number of arguments. Rooms that are not
        orgcast rooms hold no socket and are dropped. No room at all means
        every socket, and is delivered only when ORGCAST_EMITTER_BROADCAST
        allows it.

        :raise ApiError: invalid_event, bad_request, invalid_room (none of the
            rooms is an orgcast room, or no room while broadcasts are off)
        :raise Unavailable: the log did not take it
        """
        if not args or not is_valid_event(args[0]):
            raise ApiError("invalid_event")
        valid = tuple(dict.fromkeys(r for r in rooms if is_valid_room(r)))
        if rooms and not valid:
            raise ApiError("invalid_room", f"no orgcast room among {len(rooms)} rooms")
        if not rooms and not self._broadcast_everyone:
            raise ApiError("invalid_room", "an emit to every socket (no room): set "
                           "ORGCAST_EMITTER_BROADCAST=true to allow them")
        excluded = tuple(dict.fromkeys(r for r in except_rooms if is_valid_room(r)))
        self._send(Publication(valid, encode_args(args), excluded, source=source, id=new_id()))

    # --- disconnects

    def disconnect_user(self, user_id: str, source: str) -> str:
        """Disconnect every socket of the user everywhere, and forget its cached acceptances.

        :raise ApiError: invalid_user
        :raise Unavailable: the log did not take it
        """
        room = self.user_room(user_id)
        self._log.append(Kick((room,), forget=(user_id,)))
        log.info("%s: disconnect user %s", source, user_id)
        return room

    def disconnect_rooms(self, rooms: Sequence[str], except_rooms: Sequence[str], source: str) -> None:
        """Disconnect the sockets in ``rooms`` (minus ``except_rooms``) everywhere.

        Users' rooms also drop those users' cached acceptances.

        :raise ApiError: invalid_room (none of the rooms is an orgcast room)
        :raise Unavailable: the log did not take it
        """
        valid = tuple(dict.fromkeys(r for r in rooms if is_valid_room(r)))
        if not valid:
            raise ApiError("invalid_room", "no orgcast room to disconnect")
        excluded = tuple(r for r in except_rooms if is_valid_room(r))
        users = tuple(r[len(USER_PREFIX):] for r in valid if r.startswith(USER_PREFIX))
        self._log.append(Kick(valid, excluded, users))
        log.info("%s: disconnect the sockets of %d rooms", source, len(valid))

    def revoke(self, organization_id: str, user_id: str, source: str) -> str:
        """Take the user's sockets out of the organization everywhere, and forget its cached acceptances.

        :raise ApiError: invalid_organization, invalid_user
        :raise Unavailable: the log did not take it
        """
        room = self.organization_room(organization_id)
        self.user_room(user_id)
        self._log.append(Revoke(organization_id, user_id))
        log.info("%s: revoke user %s in organization %s", source, user_id, organization_id)
        return room

    # --- ids

    @staticmethod
    def organization_room(organization_id: str) -> str:
        """Return ``organization.<id>``.

        :raise ApiError: invalid_organization
        """
        if not is_valid_organization_id(organization_id):
            raise ApiError("invalid_organization")
        return organization_room(organization_id)

    @staticmethod
    def user_room(user_id: str) -> str:
        """Return ``user.<id>``.

        :raise ApiError: invalid_user
        """
        if not is_valid_user_id(user_id):
            raise ApiError("invalid_user")
        return user_room(user_id)
