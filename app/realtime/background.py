"""A task of the worker that runs in its own greenlet from ``start`` to ``stop``."""

from __future__ import annotations

import gevent


class Background:
    """``_run`` in a greenlet of its own, started once and killed (without waiting) at ``stop``."""

    _runner: gevent.Greenlet | None = None

    def start(self) -> None:
        """Run the task (once per worker)."""
        if self._runner is None and self._wanted():
            self._runner = gevent.spawn(self._run)

    def stop(self) -> None:
        """Stop the task."""
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.kill(block=False)

    def _wanted(self) -> bool:
        """Whether the task has anything to do in this configuration."""
        return True

    def _run(self) -> None:
        raise NotImplementedError
