"""What the Socket.IO emitter formats have in common, read as Node's adapters read them.

``[uid, packet, opts]`` (Redis emitters), ``[packet, opts]`` (the original
PHP emitter) and ``{type, data: {packet, opts}}`` (the Postgres emitter) all
carry a Socket.IO ``packet = {type: 2, data: [event, ...args], nsp: "/"}``
and ``opts = {rooms: [...], except: [...], flags: {...}}``. PHP's msgpack
packs an empty array as a list where a map was meant, and rooms may arrive
as integers: both are read as Node reads them.

Whatever cannot be delivered raises ``Dropped`` with the reason; the
listener logs it (rate-limited), counts it and goes on.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

from app.errors import ApiError, Unavailable

#: lines a backend's garbage can cause: rate-limited by app/log.py
log = logging.getLogger("app.sources")

EVENT = 2
BINARY_EVENT = 5
NAMESPACE = "/"


class Dropped(Exception):
    """A message orgcast does not deliver; the text says why."""


def as_list(value: Any) -> list[Any]:
    """A list from a msgpack list, a map PHP meant as a list, or nothing."""
    if value is None:
        return []
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        return list(value.values())
    raise Dropped("a room list is neither a list nor a map")


def room_names(value: Any) -> list[str]:
    """Room names as strings (Node's adapters accept integers: ``in(42)``)."""
    names = []
    for room in as_list(value):
        if isinstance(room, bool) or not isinstance(room, str | int):
            raise Dropped("a room name is neither a string nor an integer")
        names.append(str(room))
    return names


def read_packet(packet: Any) -> list[Any]:
    """Return ``[event, ...args]`` of an EVENT packet to the main namespace.

    :raise Dropped: another namespace, a binary or unknown packet type, no event
    """
    if not isinstance(packet, dict):
        raise Dropped("the packet is not a map")
    nsp = packet.get("nsp", NAMESPACE)
    if nsp != NAMESPACE:
        raise Dropped(f"namespace {str(nsp)[:40]!r}: orgcast serves '/' only")
    kind = packet.get("type")
    if kind == BINARY_EVENT:
        raise Dropped("binary events are not supported")
    if kind != EVENT:
        raise Dropped(f"packet type {str(kind)[:10]}")
    data = packet.get("data")
    if not isinstance(data, list) or not data:
        raise Dropped("the packet carries no event")
    return data


def read_opts(opts: Any) -> tuple[list[str], list[str]]:
    """Return (rooms, except) of broadcast options."""
    if opts is None or opts == []:
        return [], []
    if not isinstance(opts, dict):
        raise Dropped("the options are not a map")
    return room_names(opts.get("rooms")), room_names(opts.get("except"))


class Drops:
    """Dropped messages by reason, for operators and the metrics."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.counts: Counter[str] = Counter()
        #: told the source of each drop (the metrics)
        self.on_drop: Callable[[str], None] | None = None

    def run(self, channel: str, handle: Callable[[], None]) -> None:
        """Run ``handle``; log and count what it drops, never raise."""
        try:
            handle()
        except Dropped as exc:
            self._drop(channel, str(exc))
        except ApiError as exc:
            self._drop(channel, exc.message)
        except Unavailable as exc:
            self._drop(channel, f"not delivered: {exc.message}")

    def _drop(self, channel: str, reason: str) -> None:
        self.counts[reason.split(":")[0][:60]] += 1
        if self.on_drop is not None:
            self.on_drop(self.source)
        log.warning("%s: dropped a message on %s: %s", self.source, channel[:80], reason)
