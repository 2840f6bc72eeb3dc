"""Logging set-up, and the redaction every log line passes through.

Tokens travel in query strings (``?token=``) and headers
(``Authorization: Bearer``); API keys in headers. ``redact`` removes them
from any text, and ``RedactingFormatter`` applies it to whole formatted
records, tracebacks included, so no handler can write one.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Callable
from typing import Any

from app import process

REDACTED = "[REDACTED]"

# Query/form parameters whose value is a credential, as they appear in URLs,
# request lines and reprs of dicts: token=..., access_token=..., 'token': '...'.
_PARAM_RE = re.compile(
    r"(?i)((?:^|[?&;\s\"'{,(])(?:access_token|token|api_key|apikey|key|auth)=)[^&\s\"']+"
)
_BEARER_RE = re.compile(r"(?i)(bearer\s+)[^\s\"',]+")
_DICT_RE = re.compile(r"(?i)(['\"](?:access_token|token|authorization|api_key)['\"]\s*:\s*['\"])[^'\"]*")
_URL_PASSWORD_RE = re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@/\s]+@")


def redact(text: str) -> str:
    """Return ``text`` with tokens, bearer credentials and URL passwords removed.

    Each pattern runs only on a line that holds what it needs to match (most
    lines hold none: one line per connect, per publish).
    """
    if not text:
        return text
    low = text.lower()
    if "=" in text:
        text = _PARAM_RE.sub(r"\1" + REDACTED, text)
    if "bearer" in low:
        text = _BEARER_RE.sub(r"\1" + REDACTED, text)
    if "token" in low or "authorization" in low or "api_key" in low:
        text = _DICT_RE.sub(r"\1" + REDACTED, text)
    if "://" in text and "@" in text:
        text = _URL_PASSWORD_RE.sub(r"\1" + REDACTED + "@", text)
    return text


class RedactingFormatter(logging.Formatter):
    """A Formatter whose every output line has passed through ``redact``."""

    _second, _stamp = -1, ""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        # The stamp has whole seconds: made once a second, not once a line.
        if datefmt is None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            self._second, self._stamp = second, super().formatTime(record, datefmt)
        return self._stamp


#: fields a line may carry besides its message (``extra=``), as JSON keys of their own
CONTEXT_FIELDS = ("request_id", "socket_id", "session_id", "code", "address", "user_id", "organization_id",
                  "latency_ms", "event", "source", "rooms", "recipients")


class JsonFormatter(RedactingFormatter):
    """One JSON object a line: time, level, logger, message (redacted), and the line's context fields."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                payload[name] = value
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return redact(json.dumps(payload, default=str))


class TracebackLimitFilter(logging.Filter):
    """Let at most ``burst`` tracebacks through per ``period`` seconds from each place.

    A place is the logger and line that logged. Past the limit the record is
    dropped; the next one let through says how many were.
    """

    def __init__(self, burst: int = 3, period: float = 60.0) -> None:
        super().__init__()
        self.burst = burst
        self.period = period
        self._places: dict[tuple[str, str, int], list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.exc_info:
            return True
        place = (record.name, record.pathname, record.lineno)
        now = time.monotonic()
        state = self._places.get(place)
        if state is None or now - state[0] >= self.period:
            dropped = state[2] if state is not None else 0
            if len(self._places) > 1000:
                self._places.clear()  # bounded, whatever the number of places
            state = self._places[place] = [now, 0.0, 0.0]
            if dropped:
                record.msg = f"(dropped {dropped:.0f} similar tracebacks in the last {self.period:.0f} s) " + str(
                    record.msg)
        if state[1] >= self.burst:
            state[2] += 1
            return False
        state[1] += 1
        return True


class RateLimitFilter(logging.Filter):
    """Let at most ``burst`` records through per ``period`` seconds.

    python-engineio logs a full traceback for every malformed packet a
    client sends; without a limit one client can fill the disks. The first
    record after a quiet window says how many were dropped.
    """

    def __init__(self, burst: int = 20, period: float = 60.0) -> None:
        super().__init__()
        self.burst = burst
        self.period = period
        self._window_start = 0.0
        self._passed = 0
        self._dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        if now - self._window_start >= self.period:
            if self._dropped:
                record.msg = f"(dropped {self._dropped} similar messages in the last {self.period:.0f} s) " + str(
                    record.msg)
            self._window_start, self._passed, self._dropped = now, 0, 0
        if self._passed >= self.burst:
            self._dropped += 1
            return False
        self._passed += 1
        return True


class BatchingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stderr handler that, in a worker, writes the lines of one turn of the event
    loop together: the first line of a turn schedules one write for all of them
    (``schedule``, gevent's ``loop.run_callback``, set by app/__init__.py), which
    runs before the loop next waits. Idle, a line goes out at once; under load, one
    ``write`` carries the lines of every greenlet the turn woke. Lines at WARNING and
    above are written at once, with what waited.

    One line per connect and per publish, each its own system call, cost more
    than a tenth of a connect's CPU (the connect profile, bench/README.md).
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.schedule: Callable[[Callable[[], None]], Any] | None = None
        self._waiting: list[str] = []
        self._size = 0

    def emit(self, record: logging.LogRecord) -> None:
        if self.schedule is None or record.levelno >= logging.WARNING:
            self._write_waiting()
            super().emit(record)
            return
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        if not self._waiting:
            self.schedule(self.flush_batch)
        self._waiting.append(line)
        self._size += len(line)
        if self._size >= 65536:
            self._write_waiting()

    def flush_batch(self) -> None:
        """Write what waits."""
        self.acquire()
        try:
            self._write_waiting()
        finally:
            self.release()

    def _write_waiting(self) -> None:
        if self._waiting:
            text, self._waiting, self._size = "".join(self._waiting), [], 0
            try:
                self.stream.write(text)
                self.flush()
            except Exception:  # as logging does: a broken stderr must not break the caller
                pass


def batching(schedule: Callable[[Callable[[], None]], Any] | None) -> None:
    """Batch the lines of ``setup_logging``'s handlers with ``schedule`` (None: stop, writing what waits)."""
    handlers = {h for name in ("app", "socketio", "engineio", "geventwebsocket")
                for h in logging.getLogger(name).handlers if isinstance(h, BatchingHandler)}
    for handler in handlers:
        handler.schedule = schedule
        if schedule is None:
            handler.flush_batch()


class _WithPid:
    """A log record factory that fills ``process`` from app/process.py."""

    def __init__(self, factory: Any) -> None:
        self._factory = factory

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record: logging.LogRecord = self._factory(*args, **kwargs)
        record.process = process.pid()
        return record


TEXT_FORMAT = "%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s"


def make_formatter(log_format: str) -> logging.Formatter:
    """Return the redacting formatter for ``text`` or ``json``."""
    if log_format == "json":
        return JsonFormatter()
    return RedactingFormatter(TEXT_FORMAT, "%Y-%m-%d %H:%M:%S %z")


def setup_logging(level: str, log_format: str) -> None:
    """Send orgcast's and its libraries' loggers to stderr, redacted and rate-limited.

    Tracebacks are capped per place (``TracebackLimitFilter``); the
    libraries' loggers and ``app.client`` (lines a client's garbage causes)
    are capped in all (``RateLimitFilter``): no client can fill the disks.
    """
    # A record asks for its thread (under gevent, a thread object for each new
    # greenlet) and its process (a system call) unless told not to: no line
    # shows the thread, and the process id is asked once (app/process.py).
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    if not isinstance(logging.getLogRecordFactory(), _WithPid):
        logging.setLogRecordFactory(_WithPid(logging.getLogRecordFactory()))
    handler = BatchingHandler()
    handler.setFormatter(make_formatter(log_format))
    handler.filters[:] = [TracebackLimitFilter()]
    for name, lvl in (("app", level), ("socketio", "error"), ("engineio", "error"),
                      ("geventwebsocket", "error")):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(lvl.upper())
        logger.propagate = False
        logger.filters[:] = [] if name == "app" else [RateLimitFilter()]
    logging.getLogger("app.client").filters[:] = [RateLimitFilter()]
