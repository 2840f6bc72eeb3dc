"""Redis messages shaped byte for byte like the two generations of PHP emitters:
``rase/socket.io-php-emitter`` (``[packet, opts]`` on ``<prefix>#emitter``) and
``ashiina/socket.io-php-emitter`` (``[uid, packet, opts]``, published once per
room, each time with the full room list). Both pack with the pure-PHP
``msgpack_pack`` of onlinecity/msgpack-php, ported below: strings as fixstr /
0xDA / 0xDB (never str8), empty arrays as lists (0x90) even where a map was
meant, integers in the smallest form.
"""

from __future__ import annotations

import struct
from typing import Any

PhpArray = dict[Any, Any] | list[Any]


def php_pack(value: Any) -> bytes:
    """msgpack_pack() of msgpack-php, for the PHP values tests need."""
    if value is None:
        return b"\xc0"
    if value is True:
        return b"\xc3"
    if value is False:
        return b"\xc2"
    if isinstance(value, int):
        if 0 <= value <= 0x7F:
            return bytes([value])
        if -32 <= value < 0:
            return struct.pack("b", value)
        if 0 < value <= 0xFF:
            return b"\xcc" + struct.pack("B", value)
        if 0 < value <= 0xFFFF:
            return b"\xcd" + struct.pack(">H", value)
        if 0 < value <= 0xFFFFFFFF:
            return b"\xce" + struct.pack(">I", value)
        if value > 0:
            return b"\xcf" + struct.pack(">Q", value)
        if value >= -0x80:
            return b"\xd0" + struct.pack("b", value)
        if value >= -0x8000:
            return b"\xd1" + struct.pack(">h", value)
        if value >= -0x80000000:
            return b"\xd2" + struct.pack(">i", value)
        return b"\xd3" + struct.pack(">q", value)
    if isinstance(value, float):
        return b"\xcb" + struct.pack(">d", value)
    if isinstance(value, str | bytes):
        raw = value.encode() if isinstance(value, str) else value
        if len(raw) < 32:
            return bytes([0xA0 | len(raw)]) + raw
        if len(raw) <= 0xFFFF:
            return b"\xda" + struct.pack(">H", len(raw)) + raw
        return b"\xdb" + struct.pack(">I", len(raw)) + raw
    if isinstance(value, list | dict):
        # A PHP array: a map when any key is not an integer, else a list
        # (so an empty array is always a list).
        items = list(value.items()) if isinstance(value, dict) else list(enumerate(value))
        is_map = any(not isinstance(k, int) for k, _ in items)
        n = len(items)
        if n < 16:
            head = bytes([(0x80 if is_map else 0x90) | n])
        elif n <= 0xFFFF:
            head = (b"\xde" if is_map else b"\xdc") + struct.pack(">H", n)
        else:
            head = (b"\xdf" if is_map else b"\xdd") + struct.pack(">I", n)
        body = b"".join((php_pack(k) if is_map else b"") + php_pack(v) for k, v in items)
        return head + body
    raise TypeError(type(value))


def _packet(args: list[Any], flags: dict[str, Any]) -> dict[str, Any]:
    # $packet['type'], then ['data'], then ['nsp'] (PHP keeps insertion order).
    packet: dict[str, Any] = {"type": 2, "data": args}
    packet["nsp"] = flags.pop("nsp", "/")
    return packet


def ashiina_frames(prefix: str, rooms: list[Any], args: list[Any],
                   flags: dict[str, Any] | None = None) -> list[tuple[str, bytes]]:
    """The (channel, message) pairs ``$emitter->in(...)->emit(...)`` publishes."""
    flags = dict(flags or {})
    packet = _packet(args, flags)
    packed = php_pack(["emitter", packet, {"rooms": list(rooms), "flags": flags or []}])
    channel = f"{prefix}#{packet['nsp']}#"
    if rooms:
        return [(f"{channel}{room}#", packed) for room in rooms]
    return [(channel, packed)]


def rase_frame(prefix: str, rooms: list[Any], args: list[Any],
               flags: dict[str, Any] | None = None) -> tuple[str, bytes]:
    """The (channel, message) the original PHP emitter publishes."""
    flags = dict(flags or {})
    packet = _packet(args, flags)
    return f"{prefix}#emitter", php_pack([packet, {"rooms": list(rooms), "flags": flags or []}])
