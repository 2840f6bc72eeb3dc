"""gunicorn integration: the worker class, its HTTP handler and the access logger.

Why a worker of our own instead of ``geventwebsocket.gunicorn.workers.
GeventWebSocketWorker`` as it is:

- its handler replaces gunicorn's access log with gevent-websocket's own
  request logger, which writes the whole request line, ``?token=`` included;
  ours logs through gunicorn's access logger, which redacts;
- it upgrades a WebSocket request before the application has looked at
  it; ours leaves the upgrade to Engine.IO (``transport/websocket.py`` has
  the frame code and says what it changes);
- gevent's pywsgi waits for ever for request headers and bodies, keeps
  reading a body the application never wanted, and leaves ``Connection:
  close`` out of the answer to a client that asked for it; ours bounds both
  waits (``ORGCAST_HEADER_TIMEOUT``, ``ORGCAST_BODY_TIMEOUT``), closes a
  connection whose body was not read to the end, and says so;
- gevent writes malformed request lines and unexpected errors to stderr as
  they came; ours logs them through gunicorn, redacted and rate-limited.

Besides gevent, gevent-websocket and gunicorn, this module imports only
orgcast's leaf modules (config, log) and the WebSocket frame code: gunicorn
loads it in the master, before gevent patches the worker.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import gevent
from gevent import pywsgi
from gunicorn.glogging import Logger
from gunicorn.workers.ggevent import GeventPyWSGIWorker, GeventResponse, PyWSGIHandler, PyWSGIServer

from app.config import load_settings
from app.errors import http_error
from app.log import make_formatter, redact, setup_logging
from app.transport.connection import STREAM_KEY, Connection
from app.transport.websocket import (
    ACCEPT_KEY,
    WebSocket,
    accept_headers,
    handshake_problem,
    is_upgrade_request,
)

log = logging.getLogger("app.serving")
#: lines a client can cause: rate-limited by app/log.py
client_errors = logging.getLogger("app.client")

#: what gunicorn's access log reads of a request that became a WebSocket
_ACCESS_LOG_KEYS = ("REMOTE_ADDR", "REMOTE_PORT", "REQUEST_METHOD", "RAW_URI", "PATH_INFO", "QUERY_STRING",
                    "SERVER_PROTOCOL", "HTTP_USER_AGENT", "HTTP_REFERER", "HTTP_X_FORWARDED_FOR", "wsgi.url_scheme")


class RequestHeaders:
    """A request's headers, parsed without the email package.

    gevent's pywsgi parses headers with ``http.client.parse_headers``, which
    runs them through ``email.parser``: about a tenth of the server's CPU
    per publish and per connect. This reads the same lines with the same
    limits as http.client and offers what pywsgi and gunicorn use of its
    ``OldMessage``.
    """

    MAX_LINE = 65536
    MAX_HEADERS = 100

    def __init__(self, lines: list[tuple[str, str]], status: str = "") -> None:
        self._lines = lines
        self.status = status

    @classmethod
    def read(cls, rfile: Any, *_: Any) -> RequestHeaders:
        """Read header lines up to the blank line (``MessageClass`` of pywsgi)."""
        lines: list[tuple[str, str]] = []
        while True:
            raw = rfile.readline(cls.MAX_LINE + 1)
            if len(raw) > cls.MAX_LINE:
                return cls([], "Line too long")
            if raw in (b"\r\n", b"\n", b""):
                return cls(lines)
            if len(lines) >= cls.MAX_HEADERS:
                raise ValueError(f"more than {cls.MAX_HEADERS} headers")
            line = raw.decode("iso-8859-1").rstrip("\r\n")
            if line[:1] in (" ", "\t") and lines:  # an obsolete continuation line
                name, value = lines[-1]
                lines[-1] = (name, value + " " + line.strip())
                continue
            name, colon, value = line.partition(":")
            if not colon or not name or name != name.strip():
                raise ValueError(f"invalid header line {line[:40]!r}")
            lines.append((name, value.strip()))

    def get(self, name: str, default: Any = None) -> Any:
        wanted = name.lower()
        for key, value in self._lines:
            if key.lower() == wanted:
                return value
        return default

    getheader = get

    def __delitem__(self, name: str) -> None:
        wanted = name.lower()
        self._lines = [(k, v) for k, v in self._lines if k.lower() != wanted]

    @property
    def headers(self) -> list[str]:
        return [f"{key}: {value}\r\n" for key, value in self._lines]

    @property
    def typeheader(self) -> Any:
        return self.get("content-type")

    def items(self) -> list[tuple[str, str]]:
        return list(self._lines)


class OrgcastHandler(PyWSGIHandler):  # type: ignore[misc]
    """gunicorn's pywsgi handler with bounded waits, lazy WebSocket upgrades and redacted logs."""

    # internal: gevent.pywsgi.WSGIHandler.{socket,code,status,environ,close_connection,requestline,rfile}
    # internal: gevent.pywsgi.WSGIHandler.{wsgi_input,response_length,response_use_chunked,time_finish}
    socket: Any
    code: Any
    status: Any
    # internal: gunicorn.workers.ggevent.PyWSGIHandler.MessageClass
    MessageClass = RequestHeaders.read
    #: set from ORGCAST_HEADER_TIMEOUT when the worker starts
    header_timeout: float = 30.0
    #: set from ORGCAST_BODY_TIMEOUT when the worker starts
    body_timeout: float = 10.0

    _header_timer: Any = None

    # internal: gunicorn.workers.ggevent.PyWSGIHandler.handle_one_request
    def handle_one_request(self) -> Any:
        # gevent's pywsgi waits for a request line and headers for ever: a
        # client that opens connections and sends nothing (or a byte a
        # minute) would hold worker_connections slots. Bound that wait as a
        # whole (a gevent Timeout raising TimeoutError in the read, which
        # pywsgi handles as a client error; the socket timeout alone bounds only
        # the gap between two reads, and a byte every few seconds never met it:
        # issue 17), and the idle time of a kept-alive connection; read_request
        # lifts both once the headers are in, so long-polls and WebSockets run
        # without them.
        if self.socket is not None:
            self.socket.settimeout(self.header_timeout)
            self._header_timer = gevent.Timeout(self.header_timeout, TimeoutError("request headers too slow"))
            self._header_timer.start()
        try:
            return super().handle_one_request()
        finally:
            self._stop_header_timer()

    # internal: gunicorn.workers.ggevent.PyWSGIHandler.read_request
    def read_request(self, raw_requestline: str) -> Any:
        result = super().read_request(raw_requestline)
        self._stop_header_timer()
        self.socket.settimeout(None)
        return result

    def _stop_header_timer(self) -> None:
        timer, self._header_timer = self._header_timer, None
        if timer is not None:
            timer.close()

    # internal: gunicorn.workers.ggevent.PyWSGIHandler.handle_one_response
    def handle_one_response(self) -> None:
        # A body must arrive within ORGCAST_BODY_TIMEOUT in all (a client
        # sending a byte every few seconds is as stuck as one sending none).
        # When the time is up, the read side is shut: the application sees
        # the body end early and answers 400, and the connection is closed.
        timer = None
        if self.content_length or self.headers.get("transfer-encoding", "").lower() == "chunked":
            timer = self.server.loop.timer(self.body_timeout)
            timer.start(self._body_expired)
        try:
            super().handle_one_response()
        finally:
            if timer is not None:
                timer.stop()
                timer.close()

    def _body_expired(self) -> None:
        if not self._body_complete() and self.socket is not None:
            log.info("request body not received within %.3g s: closing the connection",
                     self.body_timeout)
            try:
                self.socket.shutdown(socket.SHUT_RD)
            except OSError:
                pass  # already gone

    def _body_complete(self) -> bool:
        # internal: gevent.pywsgi.Input.{chunked_input,chunk_length,position,content_length}
        body = self.wsgi_input
        if body is None:
            return True
        if body.chunked_input:
            # internal: gevent.pywsgi.Input._chunked_input_error
            return bool(body.chunk_length == 0 and not body._chunked_input_error)
        return bool(body.position >= (body.content_length or 0))

    # internal: gunicorn.workers.ggevent.PyWSGIHandler.start_response
    def start_response(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        write = super().start_response(status, headers, exc_info)
        if self.code != 101 and not self._body_complete():
            # Answered before the body was read (a 401, a 413): reading the
            # rest could take for ever, so close instead of keeping it alive,
            # and do not let pywsgi try to discard it.
            self.close_connection = True
            # internal: gevent.pywsgi.Input._chunked_input_error
            self.wsgi_input._chunked_input_error = True
        if (self.close_connection and self.request_version == "HTTP/1.1" and self.code != 101
                and not any(name.lower() == b"connection" for name, _ in self.response_headers)):
            # pywsgi closes after the answer but does not say so on HTTP/1.1:
            # keep-alive clients (node-fetch, Node >= 19) then reused a dead socket.
            self.response_headers.append((b"Connection", b"close"))
        return write

    # --- WebSocket

    # internal: gunicorn.workers.ggevent.PyWSGIHandler.run_application
    def run_application(self) -> Any:
        if is_upgrade_request(self.environ):
            problem = handshake_problem(self.environ)
            if problem is not None:
                self._answer_json(400, "bad_request", problem)
                return None
            self.environ[ACCEPT_KEY] = self._accept_websocket
        elif self.environ.get("REQUEST_METHOD") == "GET":
            self.environ[STREAM_KEY] = self._accept_stream
        # pywsgi's own run_application: the application decides (Engine.IO
        # upgrades through ACCEPT_KEY when it accepts the session).
        return pywsgi.WSGIHandler.run_application(self)

    def _accept_websocket(self) -> WebSocket:
        """Answer 101 now and return the WebSocket (called by Engine.IO)."""
        self.close_connection = True
        self.start_response("101 Switching Protocols", accept_headers(self.environ))
        # No Content-Length, Transfer-Encoding or Date on a 101.
        self.provided_content_length = False
        self.provided_date = True
        self.response_use_chunked = False
        self.write(b"")  # send the headers
        # A WebSocket lives for hours: keep of the request only what its
        # access-log line needs. The environ is cleared in place, since the
        # frames of the WSGI call below hold it too; the request's buffered
        # reader (and its 8 KiB buffer) goes: frames are read from the socket.
        self._keep_for_access_log()
        return WebSocket(self.socket, owner=self)

    def _keep_for_access_log(self) -> None:
        kept = {key: self.environ[key] for key in _ACCESS_LOG_KEYS if key in self.environ}
        self.environ.clear()
        self.environ.update(kept)
        self.headers: Any = {}
        self.response_headers: list[Any] = []
        self.rfile.close()

    def _accept_stream(self, status: str, headers: list[tuple[str, str]], first: bytes,
                       kind: Callable[[Any, Any, bool], Connection]) -> Connection:
        """Answer ``status`` with a body that never ends here: headers and ``first`` now; return
        ``kind(socket, self, chunked)``, which writes the rest itself (``http/stream.py``)."""
        self.close_connection = True
        self.start_response(status, headers)
        self.write(first)  # pywsgi chose chunked for an HTTP/1.1 body of no length
        chunked = bool(self.response_use_chunked)
        self.response_use_chunked = False  # the body's end is the stream's, not the request's
        self._keep_for_access_log()
        return kind(self.socket, self, chunked)

    def hand_over(self, sock: Any) -> Any:
        """Let go of a WebSocket's socket (its watcher reads it now); return what frees its slot."""
        self.socket = None  # pywsgi closes the connection of a finished request otherwise
        release: Any = self.server.adopt_socket(sock)
        return release

    # internal: gunicorn.workers.ggevent.PyWSGIHandler._sendall
    def _sendall(self, data: Any) -> None:
        """pywsgi's, with one plain send first: gevent's sendall asks the kernel for
        SO_SNDBUF before every write, a syscall the connect profile showed costing as
        much as the 101's write itself. What the kernel does not take now goes the
        usual way (and all of it on TLS, which orgcast leaves to nginx)."""
        if getattr(self.socket, "_sslobj", None) is not None:
            return super()._sendall(data)  # type: ignore[no-any-return]
        try:
            # internal: gevent.socket.socket._sock
            sent = self.socket._sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as ex:
            self.status = f"socket error: {ex}"
            if self.code > 0:
                self.code = -self.code
            raise
        self.response_length += sent
        if sent < len(data):
            super()._sendall(memoryview(data)[sent:])

    def _answer_json(self, status: int, code: str, message: str) -> None:
        line, body = http_error(status, code, message)
        data = json.dumps(body).encode()
        self.close_connection = True
        self.start_response(line, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
        self.write(data)

    # --- errors and logs

    # internal: gunicorn.workers.ggevent.PyWSGIHandler._handle_client_error
    def _handle_client_error(self, ex: BaseException) -> Any:
        if isinstance(ex, TimeoutError):
            return None  # headers never finished: close quietly, no traceback
        return super()._handle_client_error(ex)

    # internal: gunicorn.workers.ggevent.PyWSGIHandler.handle_error
    def handle_error(self, t: Any, v: Any, tb: Any) -> None:
        # pywsgi prints the traceback of an error that escaped the application
        # to stderr, unredacted and unlimited; log it through ours instead.
        log.error("unhandled error in a request", exc_info=(t, v, tb))
        del tb
        self.close_connection = True
        if not self.response_length:
            try:
                self._answer_json(500, "internal_error", "Internal error.")
            except OSError:
                pass  # the client is gone

    # internal: gunicorn.workers.ggevent.PyWSGIHandler.log_request
    def log_request(self) -> None:
        if getattr(self, "environ", None) is not None:
            PyWSGIHandler.log_request(self)
            return
        # gevent refused the request (bad request line or headers, line too
        # long) before building an environ, and gunicorn's log_request then
        # died with a traceback instead of writing the line.
        line = str(self.requestline or "").strip()[:1024]
        method, _, rest = line.partition(" ")
        uri, _, protocol = rest.rpartition(" ") if " " in rest else (rest, "", "")
        address = self.client_address
        environ = {"REMOTE_ADDR": address[0] if isinstance(address, tuple) else str(address),
                   "REQUEST_METHOD": method or "-", "RAW_URI": uri or "-",
                   "SERVER_PROTOCOL": protocol or "-"}
        status = self.status.decode() if isinstance(self.status, bytes) else str(self.status)
        elapsed = timedelta(seconds=max(0.0, (self.time_finish or time.time()) - self.time_start))
        self.server.log.access(GeventResponse(status, [], self.response_length), [], environ,
                               elapsed)

    # internal: gunicorn.workers.ggevent.PyWSGIHandler.log_error
    def log_error(self, msg: str, *args: Any) -> None:
        try:
            message = msg % args if args else msg
        except Exception:
            message = msg
        # Through orgcast's log of what clients cause: redacted, in the configured
        # format, and capped like every line a client's garbage makes (issue 17:
        # 2,000 malformed requests were 2,000 uncapped warnings).
        client_errors.warning("%s", redact(str(message)))


def _print_exception(context: Any, type_: Any, value: Any, tb: Any) -> None:
    """gevent hub's error printer, through orgcast's rate-limited, redacting log."""
    logging.getLogger("app.greenlet").error("unhandled error in a greenlet (%s)", type(context).__name__,
                                            exc_info=(type_, value, tb))


class OrgcastServer(PyWSGIServer):  # type: ignore[misc]
    """gunicorn's pywsgi server, counting the WebSockets its handlers handed over.

    A WebSocket outlives its request's greenlet (``transport/websocket.py``:
    ``adopt``): the server must not close its socket when the request ends,
    and must still count it against ``worker_connections``.
    """

    #: the servers of this worker process (one per listening socket)
    instances: list[OrgcastServer] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        OrgcastServer.instances.append(self)
        self.adopted = 0
        self._handed_over: set[int] = set()
        if self.pool is not None:
            # set_spawn() made pool.full the server's full(): count ours too.
            self.full = self._full

    def _full(self) -> bool:
        return bool(self.pool.free_count() - self.adopted <= 0)

    def adopt_socket(self, sock: Any) -> Any:
        """Count ``sock`` as a connection until the returned callable is called."""
        self.adopted += 1
        self._handed_over.add(id(sock))

        def release() -> None:
            self.adopted -= 1
            # internal: gevent.server.StreamServer._start_accepting_if_started
            self._start_accepting_if_started()

        return release

    # internal: gunicorn.workers.ggevent.PyWSGIServer.do_close
    def do_close(self, sock: Any, *args: Any) -> None:
        if id(sock) in self._handed_over:
            self._handed_over.discard(id(sock))
            return  # its WebSocket closes it
        super().do_close(sock, *args)


def configure(max_message: int, max_buffer: int, header_timeout: float, body_timeout: float) -> None:
    """Apply the app's transport limits (``create_app`` calls it with its Settings, in the worker).

    Class attributes, read by every handler and connection of the process: the
    worker used to read them from the environment itself, so that
    ``create_app(settings)`` could not change them (issue 18).
    """
    WebSocket.max_message = max_message
    Connection.max_buffer = max_buffer  # WebSockets and event streams
    OrgcastHandler.header_timeout = header_timeout
    OrgcastHandler.body_timeout = body_timeout


class OrgcastWorker(GeventPyWSGIWorker):  # type: ignore[misc]
    """gunicorn's gevent pywsgi worker speaking WebSocket through OrgcastHandler."""

    # internal: gunicorn.workers.ggevent.GeventPyWSGIWorker.wsgi_handler
    wsgi_handler = OrgcastHandler
    # internal: gunicorn.workers.ggevent.GeventPyWSGIWorker.server_class
    server_class = OrgcastServer

    # internal: gunicorn.workers.ggevent.GeventPyWSGIWorker.init_process
    def init_process(self) -> None:
        # (The transport's limits come from the app's Settings: ``configure``, called by create_app.)
        # With several workers, accept one connection per wake-up (as gunicorn's
        # own gevent server does), so that a burst spreads over the workers.
        OrgcastServer.max_accept = 1 if self.cfg.workers > 1 else 100
        super().init_process()

    _drainer: Any = None

    # internal: gunicorn.workers.ggevent.GeventPyWSGIWorker.handle_exit
    def handle_exit(self, sig: int, frame: Any) -> None:
        """SIGTERM (gunicorn's graceful stop and reload): stop, but deliver and hand clients over first.

        The drain (``app.Runtime.drain``) waits to hear back a marker published
        on the bus now, so that every event accepted before the signal reaches
        the sockets connected then, and closes the sessions, whose clients
        reconnect at once to another worker. ``run`` waits for it before the
        worker exits: websockets are not in gunicorn's pool, which would let
        the worker go at once.
        """
        super().handle_exit(sig, frame)
        if self._drainer is None:
            self._drainer = gevent.spawn(self._drain)

    def _drain(self) -> None:
        # No new connection first (close(), so that nothing starts accepting
        # again): a client handed over must reconnect elsewhere.
        # A server gunicorn has made but not started yet (the signal came while the worker
        # booted) is left to it: it starts it, sees the worker is no longer alive and closes
        # it. Closing it here made its start fail with a traceback (no socket).
        for server in OrgcastServer.instances:
            if server.started:
                server.close()
        runtime = getattr(self.wsgi, "runtime", None)
        if runtime is not None:
            runtime.drain(max(1.0, self.cfg.graceful_timeout / 2))

    # internal: gunicorn.workers.ggevent.GeventPyWSGIWorker.run
    def run(self) -> None:
        # Errors in greenlets the hub runs (timers, spawned tasks) are printed
        # by the hub to stderr; send them through the log instead.
        # internal: gevent.hub.Hub.print_exception
        gevent.get_hub().print_exception = _print_exception
        super().run()
        if self._drainer is not None:
            self._drainer.join(timeout=self.cfg.graceful_timeout)


class RedactingLogger(Logger):  # type: ignore[misc]
    """gunicorn's logger with every access-log atom and log line redacted."""

    # internal: gunicorn.glogging.Logger.setup
    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        settings = load_settings()
        for logger in (self.error_log, self.access_log):
            for handler in logger.handlers:
                handler.setFormatter(make_formatter("json") if settings.log_format == "json"
                                     else _wrap(handler.formatter))
        setup_logging(settings.log_level, settings.log_format)

    # internal: gunicorn.glogging.Logger.access
    def access(self, resp: Any, req: Any, environ: Any, request_time: Any) -> None:
        if not self.access_log_enabled:
            return
        try:
            self.access_log.info(self.cfg.access_log_format, AccessAtoms(self, resp, req, environ, request_time))
        except Exception:
            self.exception("the access log line could not be written")

    # internal: gunicorn.glogging.Logger.atoms
    def atoms(self, resp: Any, req: Any, environ: Any, request_time: Any) -> dict[str, Any]:
        atoms: dict[str, Any] = super().atoms(resp, req, environ, request_time)
        for key, value in atoms.items():
            if isinstance(value, str):
                atoms[key] = redact(value)
        return atoms


class AccessAtoms(dict[str, Any]):
    """gunicorn's access-log atoms, each built, redacted and quoted (as its ``SafeAtoms``) only
    when the format names it.

    gunicorn builds all of them for every request: one per environ key and
    header, ~50, each of which had to be redacted, for a line that uses six.
    That was 190 µs a request (85 without the redaction), a seventh of a
    connect's CPU in the connect profile. The atoms of the default format are
    built here; any other comes from gunicorn's own ``atoms`` (built once).
    """

    def __init__(self, logger: RedactingLogger, resp: Any, req: Any, environ: Any, request_time: Any) -> None:
        super().__init__()
        self._args = (resp, req, environ, request_time)
        self._logger = logger
        self._all: dict[str, Any] | None = None

    def __bool__(self) -> bool:
        return True  # logging passes a mapping on only if it is true (this one starts empty)

    def __missing__(self, key: str) -> Any:
        resp, req, environ, request_time = self._args
        if key == "h":
            value: Any = environ.get("REMOTE_ADDR", "-")
        elif key == "r":
            value = f"{environ['REQUEST_METHOD']} {environ['RAW_URI']} {environ['SERVER_PROTOCOL']}"
        elif key == "s":
            value = resp.status.split(None, 1)[0] if isinstance(resp.status, str) else resp.status
        elif key == "b":
            value = getattr(resp, "sent", None) is not None and str(resp.sent) or "-"
        elif key == "M":
            value = request_time.seconds * 1000 + int(request_time.microseconds / 1000)
        elif key == "a":
            value = environ.get("HTTP_USER_AGENT", "-")
        else:
            if self._all is None:
                self._all = Logger.atoms(self._logger, resp, req, environ, request_time)
            value = self._all.get(key.lower() if key.startswith("{") else key, "-")
        if isinstance(value, str):
            value = redact(value).replace('"', '\\"')
        self[key] = value
        return value


def _wrap(formatter: Any) -> Any:
    """Keep gunicorn's format, redact its output."""
    redacting = make_formatter("text")
    if formatter is not None:
        redacting._fmt = formatter._fmt
        redacting._style = formatter._style
        redacting.datefmt = formatter.datefmt
    return redacting
