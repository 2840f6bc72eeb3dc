"""This process's id and random bytes, asked of the kernel once in a while.

``os.getpid()`` is a system call (glibc no longer caches it), and logging
(every line) and prometheus-client's multiprocess mode (every value it
changes) ask for it: in the connect profile, several per connect. So is
``os.urandom``, behind every session id, recovery pid and request id: the
bytes are read 8 KiB ahead, from the same CSPRNG. Both are forgotten at a
fork, so a worker never reports its master's id nor reuses its bytes.
"""

from __future__ import annotations

import os

_pid = 0
_registered = False
_random = b""
_random_at = 0


def pid() -> int:
    """This process's id."""
    global _pid, _registered
    if not _pid:
        if not _registered:
            os.register_at_fork(after_in_child=_forget)
            _registered = True
        _pid = os.getpid()
    return _pid


def random_bytes(n: int) -> bytes:
    """``n`` bytes from ``os.urandom``, read ahead."""
    global _random, _random_at
    if _random_at + n > len(_random):
        pid()  # (registers the fork hook)
        _random, _random_at = os.urandom(max(8192, n)), 0
    chunk = _random[_random_at:_random_at + n]
    _random_at += n
    return chunk


def _forget() -> None:
    global _pid, _random, _random_at
    _pid, _random, _random_at = 0, b"", 0
