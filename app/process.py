"""This process's id, asked of the kernel once per process.

``os.getpid()`` is a system call (glibc no longer caches it), and logging
(every line) and prometheus-client's multiprocess mode (every value it
changes) ask for it: in the connect profile, several per connect. The id is
forgotten at a fork, so a worker never reports its master's.
"""

from __future__ import annotations

import os

_pid = 0
_registered = False


def pid() -> int:
    """This process's id."""
    global _pid, _registered
    if not _pid:
        if not _registered:
            os.register_at_fork(after_in_child=_forget)
            _registered = True
        _pid = os.getpid()
    return _pid


def _forget() -> None:
    global _pid
    _pid = 0
