"""orgcast's own bus messages, and their one wire form (JSON text).

Why not python-socketio's ``PubSubManager``: its listener hands what other
workers publish to ``Manager.emit``, which bypasses ``realtime/fanout.py``
(the only place that writes events to sockets, and the fast one), and its
message set is closed to python-socketio's own calls. orgcast's bus carries
these messages instead, and every worker's listener hands each one to the
local delivery:

- ``Publication``: an event for the sockets in ``rooms`` (none: every
  socket, behind ``ORGCAST_EMITTER_BROADCAST``), minus those in
  ``except_rooms``. ``args`` is the JSON text of the Socket.IO event
  arguments, ``[event, data, ...]``, encoded once by the publisher so that
  no worker encodes it again; ``position`` is its place in the log (set
  when it is read from the log, never encoded: the log keeps it).
- ``Kick``: disconnect the sockets in ``rooms`` (minus ``except_rooms``),
  and forget the cached acceptances of the users ``forget`` on every worker.
- ``Hello``, ``Ask``, ``Answer``: the workers of the deployment telling each
  other they are alive, and questions asked of all of them (``bus/cluster.py``).

``Publication`` and ``Kick`` are *log entries*: appended to the bus's log,
where each has a position (its place in the order orgcast accepted them),
and read by every worker from its cursor. The others are *signals*: sent to
whoever listens now, and lost for a worker that is not (``bus/ports.py``).

JSON only: whoever can publish on the bus can send events to rooms, never
run code, and never put a socket in a room.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Publication:
    """An event for the sockets in some rooms."""

    rooms: tuple[str, ...]
    args: str
    except_rooms: tuple[str, ...] = ()
    #: its place in the log (set by the reader; 0 before it is appended)
    position: int = 0
    source: str = ""
    #: its id in the logs (a request id, or made up by the publisher)
    id: str = ""


@dataclass(frozen=True)
class Kick:
    """Disconnect the sockets in some rooms; forget a user's cached acceptances."""

    rooms: tuple[str, ...]
    except_rooms: tuple[str, ...] = ()
    forget: tuple[str, ...] = ()


@dataclass(frozen=True)
class Revoke:
    """The user is no longer a member of the organization: its sockets leave the room, caches forget."""

    organization_id: str
    user_id: str
    #: why: forbidden (the membership is gone)
    code: str = "forbidden"


@dataclass(frozen=True)
class Member:
    """A user's first socket of the deployment arrived in an organization (``joined``), or its last one went."""

    organization_id: str
    user_id: str
    joined: bool


@dataclass(frozen=True)
class Hello:
    """A worker is alive (sent every few seconds), or leaving (``bye``); ``reply``: answer with yours."""

    peer: str
    bye: bool = False
    reply: bool = False


@dataclass(frozen=True)
class Ask:
    """A question for every worker: ``what`` (with ``arg``), answered to ``peer``."""

    id: str
    peer: str
    what: str
    arg: str = ""


@dataclass(frozen=True)
class Answer:
    """One worker's answer (``data``: JSON) to the question ``id`` of ``to``."""

    id: str
    peer: str
    to: str
    data: Any = None


Entry = Publication | Kick | Revoke | Member
Signal = Hello | Ask | Answer
Message = Entry | Signal

VERSION = 1


def encode(message: Message) -> str:
    """Return the JSON text of a bus message."""
    body: dict[str, Any]
    if isinstance(message, Publication):
        body = {"v": VERSION, "k": "pub", "rooms": list(message.rooms), "args": message.args}
        if message.except_rooms:
            body["except"] = list(message.except_rooms)
        if message.source:
            body["src"] = message.source
        if message.id:
            body["id"] = message.id
    elif isinstance(message, Kick):
        body = {"v": VERSION, "k": "kick", "rooms": list(message.rooms)}
        if message.except_rooms:
            body["except"] = list(message.except_rooms)
        if message.forget:
            body["forget"] = list(message.forget)
    elif isinstance(message, Revoke):
        body = {"v": VERSION, "k": "revoke", "rooms": [], "org": message.organization_id, "user": message.user_id,
                "code": message.code}
    elif isinstance(message, Member):
        body = {"v": VERSION, "k": "member", "rooms": [], "org": message.organization_id, "user": message.user_id,
                "joined": message.joined}
    elif isinstance(message, Hello):
        body = {"v": VERSION, "k": "hello", "rooms": [], "peer": message.peer}
        if message.bye:
            body["bye"] = True
        if message.reply:
            body["reply"] = True
    elif isinstance(message, Ask):
        body = {"v": VERSION, "k": "ask", "rooms": [], "id": message.id, "peer": message.peer,
                "what": message.what, "arg": message.arg}
    else:
        body = {"v": VERSION, "k": "answer", "rooms": [], "id": message.id, "peer": message.peer,
                "to": message.to, "data": message.data}
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)


def _strings(value: Any, name: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{name} must be a list of strings")
    return tuple(value)


def _string(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a string")
    return value


def with_position(entry: Entry, position: int) -> Entry:
    """The entry as read from the log at ``position``."""
    if isinstance(entry, Publication):
        return Publication(entry.rooms, entry.args, entry.except_rooms, position, entry.source, entry.id)
    return entry


def decode(text: str | bytes) -> Message:
    """Parse a bus message.

    :raise ValueError: not JSON, or not a message of this version
    """
    try:
        body = json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if not isinstance(body, dict) or body.get("v") != VERSION:
        raise ValueError("not an orgcast bus message")
    kind = body.get("k")
    rooms = _strings(body.get("rooms"), "rooms")
    except_rooms = _strings(body.get("except", []), "except")
    if kind == "pub":
        args = body.get("args")
        if not isinstance(args, str):
            raise ValueError("args must be a string")
        return Publication(rooms, args, except_rooms, 0, str(body.get("src", ""))[:32], str(body.get("id", ""))[:80])
    if kind == "kick":
        return Kick(rooms, except_rooms, _strings(body.get("forget", []), "forget"))
    if kind == "revoke":
        return Revoke(_string(body, "org"), _string(body, "user"), str(body.get("code", "forbidden"))[:32])
    if kind == "member":
        return Member(_string(body, "org"), _string(body, "user"), bool(body.get("joined")))
    if kind == "hello":
        return Hello(_string(body, "peer"), bool(body.get("bye")), bool(body.get("reply")))
    if kind == "ask":
        return Ask(_string(body, "id"), _string(body, "peer"), _string(body, "what"), str(body.get("arg", "")))
    if kind == "answer":
        return Answer(_string(body, "id"), _string(body, "peer"), _string(body, "to"), body.get("data"))
    raise ValueError(f"unknown message kind {kind!r}")
