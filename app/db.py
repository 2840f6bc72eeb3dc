"""Postgres access: a cooperative, bounded connection pool with hard time limits.

Why not psycopg2's own pools: ``ThreadedConnectionPool`` raises at once when
exhausted instead of waiting, and keeps connections that a ``gevent.Timeout``
left closed mid-query. Here a caller waits (cooperatively, bounded) for a
slot, and any connection that saw an error or a timeout is thrown away.

Every operation runs under one ``gevent.Timeout`` covering the pool wait,
the connect and the query. The server-side ``statement_timeout`` frees the
database too, but only the client-side deadline helps when the database
host is hung or unreachable (libpq's ``connect_timeout`` does not apply to
the asynchronous connections that psycogreen makes).

``psycopg2`` errors never leave this module: they become ``Unavailable``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeAlias

import gevent
import gevent.lock
import psycogreen.gevent
import psycopg2
import psycopg2.errors
import psycopg2.extensions

from app.errors import Unavailable

log = logging.getLogger(__name__)

#: psycopg2 ships no type information
Connection: TypeAlias = Any


class Conflict(Exception):
    """The statement would have made a row a unique index holds already (nothing was changed)."""


class QueryError(Unavailable):
    """The database refused the statement itself (bad SQL, type mismatch)."""

    def __init__(self, detail: str) -> None:
        super().__init__("the database could not answer")
        #: for the log, not for clients
        self.detail = detail


class Database:
    """A bounded pool of autocommit connections to the application database."""

    def __init__(self, dsn: str, *, pool_size: int, timeout: float,
                 timezone: str | None = None, application_name: str = "orgcast",
                 observer: Callable[[float, bool], None] | None = None) -> None:
        # Make libpq waits yield to the gevent hub instead of blocking it.
        psycogreen.gevent.patch_psycopg()
        self._dsn = dsn
        self._timeout = timeout
        options = [f"-c statement_timeout={max(1, int(timeout * 1000))}"]
        if timezone:
            options.append(f"-c TimeZone={timezone}")
        self._connect_kwargs: dict[str, Any] = {
            "options": " ".join(options),
            "application_name": application_name,
            "connect_timeout": max(1, int(timeout + 0.999)),
        }
        self._slots = gevent.lock.BoundedSemaphore(pool_size)
        self._idle: list[Connection] = []
        self.pool_size = pool_size
        #: told (seconds, ok) of every operation (the metrics' database latency)
        self.observer = observer
        #: while the database fails: when it began, and how many operations failed since
        self._failing_since: float | None = None
        self._failures = 0

    def fetch_one(self, sql: str, params: Mapping[str, Any],
                  timeout: float | None = None) -> tuple[Any, ...] | None:
        """Run ``sql`` with named ``params``; return the first row or None.

        :raise Unavailable: pool exhausted, database down, slow or erroring
        """
        rows = self.fetch_all(sql, params, timeout, limit=1)
        return rows[0] if rows else None

    def fetch_all(self, sql: str, params: Mapping[str, Any], timeout: float | None = None,
                  limit: int | None = None) -> list[tuple[Any, ...]]:
        """Run ``sql`` with named ``params``; return its rows (at most ``limit``).

        :raise Unavailable: pool exhausted, database down, slow or erroring
        """
        if self.observer is None:
            return self._fetch_all(sql, params, timeout, limit)
        started, ok = time.monotonic(), False
        try:
            rows = self._fetch_all(sql, params, timeout, limit)
            ok = True
            return rows
        except Conflict:
            ok = True  # the database answered: a row that is already there
            raise
        finally:
            self.observer(time.monotonic() - started, ok)

    def _fetch_all(self, sql: str, params: Mapping[str, Any], timeout: float | None,
                   limit: int | None) -> list[tuple[Any, ...]]:
        try:
            rows = self._run(sql, params, timeout, limit)
        except QueryError:
            raise
        except Unavailable as exc:
            self._failed(getattr(exc, "detail", exc.message))
            raise
        if self._failing_since is not None:
            log.warning("database answers again after %.1f s (%d operations failed meanwhile)",
                        time.monotonic() - self._failing_since, self._failures)
            self._failing_since, self._failures = None, 0
        return rows

    def _failed(self, why: str) -> None:
        """One line when an outage begins (not one per refused operation); counted until it ends."""
        self._failures += 1
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            log.warning("database unavailable: %s", why)

    def _run(self, sql: str, params: Mapping[str, Any], timeout: float | None,
             limit: int | None) -> list[tuple[Any, ...]]:
        budget = self._timeout if timeout is None else timeout
        with self._deadline(budget), self._slot(budget):
            # An idle connection may have died with a database restart: then
            # try once more on a new one, within the same deadline.
            for reuse in (True, False):
                conn = self._idle.pop() if reuse and self._idle else self._connect()
                try:
                    with conn.cursor() as cur:
                        cur.execute(sql, params)
                        rows = cur.fetchmany(limit) if limit is not None else cur.fetchall()
                except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
                    broken = bool(conn.closed)
                    self._discard(conn)
                    if reuse and broken:
                        continue
                    raise _unavailable(exc) from None
                except psycopg2.errors.UniqueViolation as exc:
                    self._idle.append(conn)  # (autocommit: nothing is left open on it)
                    raise Conflict(_first_line(exc)) from None
                except (psycopg2.ProgrammingError, psycopg2.DataError) as exc:
                    self._discard(conn)
                    log.warning("database refused the statement: %s", _first_line(exc))
                    raise QueryError(_first_line(exc)) from None
                except psycopg2.Error as exc:
                    self._discard(conn)
                    raise _unavailable(exc) from None
                except BaseException:
                    self._discard(conn)  # a timeout mid-query leaves it unusable
                    raise
                self._idle.append(conn)
                return [tuple(row) for row in rows]
        raise AssertionError("unreachable")

    def ping(self, timeout: float | None = None) -> float:
        """Run ``SELECT 1``; return the round trip in milliseconds.

        :raise Unavailable: as ``fetch_one``
        """
        started = time.monotonic()
        self.fetch_one("SELECT 1", {}, timeout)
        return (time.monotonic() - started) * 1000.0

    def close(self) -> None:
        """Close every idle connection."""
        while self._idle:
            self._discard(self._idle.pop())

    @contextmanager
    def _deadline(self, budget: float) -> Iterator[None]:
        deadline = gevent.Timeout(budget)
        deadline.start()
        try:
            yield
        except gevent.Timeout as exc:
            if exc is not deadline:
                raise
            unavailable = Unavailable("the database did not answer in time")
            unavailable.detail = f"no answer within {budget:.1f} s"
            raise unavailable from None
        finally:
            deadline.close()

    @contextmanager
    def _slot(self, budget: float) -> Iterator[None]:
        if not self._slots.acquire(timeout=budget):
            raise Unavailable("all database connections are busy")
        try:
            yield
        finally:
            self._slots.release()

    def _connect(self) -> Connection:
        try:
            conn = psycopg2.connect(self._dsn, **self._connect_kwargs)
        except psycopg2.Error as exc:
            raise _unavailable(exc) from None
        conn.autocommit = True
        return conn

    @staticmethod
    def _discard(conn: Connection) -> None:
        try:
            conn.close()
        except Exception:  # already broken: nothing more to free
            log.debug("closing a broken connection failed", exc_info=True)


def _first_line(exc: Exception) -> str:
    # The first line only: later lines may quote the statement's parameters.
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"


def _unavailable(exc: Exception) -> Unavailable:
    unavailable = Unavailable("the database could not answer")
    unavailable.detail = _first_line(exc)  # for the log only: clients see the message
    return unavailable
