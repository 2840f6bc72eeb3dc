"""The bus's few small interfaces; each backend implements them.

python-socketio splits its manager from its pub/sub, Centrifugo its broker
from its presence manager; orgcast's bus has four concerns, each its own
interface, so that a feature asks only for what it uses:

- ``Log``: entries (publications, kicks) appended in one order, each with
  its *position*; every worker reads every entry after its cursor, also
  after its connection was lost (``bus/listener.py``). A ``202`` means
  "appended": a worker that was away catches up when it is back.
- ``Signals``: heartbeats and questions between the workers
  (``bus/cluster.py``), to whoever listens now; lost for one that does not.
- ``History``: the publications each room still keeps, by position
  (recovery of missed events, rewind).
- ``Sessions``: what a socket's recovery needs and its pid cannot carry —
  the organizations it subscribed to — and the secret every worker of the
  deployment signs pids with.
- ``PresenceStore``: which workers hold a user in an organization.

Backends: ``postgres.PostgresBus`` + ``postgres_store.PostgresStore``
(the default, needing nothing but the database) and ``redis.RedisBus`` +
``redis_store.RedisStore`` (with ``REDIS_URL``).
"""

from __future__ import annotations

from typing import Protocol

from app.bus.envelope import Entry, Signal

#: what a socket missed in some rooms: (position, the event's args as JSON, the rooms it was not for), in order
Missed = list[tuple[int, str, tuple[str, ...]]]


class Log(Protocol):
    def append(self, entry: Entry, key: str | None = None) -> int | None:
        """Append an entry after every other; return its position.

        With an idempotency ``key``: None, and nothing appended, when the key
        was taken for the entry's room within the idempotency window (the
        check and the append are one step).

        :raise Unavailable: the log did not take it
        """
        ...

    def head(self) -> int:
        """The position of the newest entry.

        :raise Unavailable: the log did not answer
        """
        ...


class Signals(Protocol):
    def signal(self, message: Signal) -> None:
        """Send a signal to every worker listening now.

        :raise Unavailable: the bus did not take it
        """
        ...


class History(Protocol):
    def since_many(self, queries: list[tuple[int, int, list[str]]]) -> list[Missed | None]:
        """For each (after, through, rooms): the publications of those rooms in (after, through], in order.

        None for a query the history cannot answer whole (trimmed by age or
        count, or a position it never gave). One round trip for all.

        :raise Unavailable: the history did not answer
        """
        ...

    def latest(self, room: str, count: int, through: int) -> Missed:
        """The newest ``count`` publications of ``room`` up to ``through``, oldest first.

        :raise Unavailable: the history did not answer
        """
        ...


class Sessions(Protocol):
    def save_organizations(self, sid: str, organizations: list[str]) -> None:
        """Keep the organizations of socket ``sid`` for its recovery (twice the window).

        :raise Unavailable: the store did not answer
        """
        ...

    def load_organizations(self, sids: list[str]) -> list[list[str] | None]:
        """The organizations kept for each sid (None: nothing kept). One round trip.

        :raise Unavailable: the store did not answer
        """
        ...

    def keep_organizations(self, sids: list[str]) -> None:
        """Extend what is kept of these live sockets by another two windows.

        :raise Unavailable: the store did not answer
        """
        ...

    def secret(self) -> bytes:
        """The deployment's secret (made by the first worker that asks).

        :raise Unavailable: the store did not answer
        """
        ...


class PresenceStore(Protocol):
    def presence_join(self, organization_id: str, user_id: str, worker: str) -> bool: ...
    def presence_leave(self, organization_id: str, user_id: str, worker: str) -> bool: ...
    def presence_forget(self, worker: str) -> list[tuple[str, str]]: ...
    def presence_workers(self) -> set[str]: ...
    def presence_pairs(self) -> set[tuple[str, str]]: ...
