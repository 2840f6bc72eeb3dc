"""gunicorn settings for orgcast, read from the environment (see README).

Sectioned like gunicorn's examples/example_config.py. Settings are validated
here, in the master, so a bad value stops start-up with one line naming the
variable instead of a worker crash loop.
"""

import gc
import os
import resource
import shutil
import sys
import tempfile

from app.config import ConfigError, load_settings

try:
    _settings = load_settings()
    if _settings.database_url is None:
        raise ConfigError("DATABASE_URL: required (a postgresql:// URL of the application database)")
except ConfigError as exc:
    print(f"orgcast: configuration error: {exc}", file=sys.stderr)
    sys.exit(2)

# --- Server socket
bind = [_settings.bind]
backlog = 2048

# --- Worker processes
workers = _settings.web_concurrency
# gevent-websocket's worker, with orgcast's frame cap and redacted logging
# (app/serving.py says why it is not GeventWebSocketWorker itself).
worker_class = "app.serving.OrgcastWorker"
# gunicorn's default of 1,000 would silently queue the 1,001st socket.
worker_connections = _settings.worker_connections
# A websocket lives for hours; gevent workers notify the arbiter on their own,
# so this bounds only a worker whose hub is stuck.
timeout = 30
graceful_timeout = 10
keepalive = 5
# No preload_app: gevent must patch the worker before the app is imported.
preload_app = False

# --- Security: request line and header limits (gunicorn's defaults, explicit)
limit_request_line = 8190
limit_request_fields = 100
limit_request_field_size = 8190

# --- Logging: tokens travel in query strings; this logger redacts them.
logger_class = "app.serving.RedactingLogger"
errorlog = "-"
loglevel = _settings.log_level
accesslog = "-" if _settings.access_log else None
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(M)sms "%(a)s"'

# --- Process naming
proc_name = "orgcast"
# gunicorn 27 opens a management socket in ~/.gunicorn by default; orgcast
# does not need one, and several instances on one host would share its path.
control_socket_disable = True


# --- Server hooks


def on_starting(server):
    """Raise the open-file limit, and set up the directory the workers share their metrics in."""
    _raise_open_files(server)
    _metrics_dir(server)


#: the metrics directory this master made itself (removed at exit)
_made_metrics_dir = []


def _metrics_dir(server):
    """prometheus-client's multiprocess mode: one directory for every worker's values.

    Set before any worker starts (each reads PROMETHEUS_MULTIPROC_DIR when it
    imports prometheus_client), emptied of a previous run's files, so that a
    scrape sums this run's workers only.
    """
    path = _settings.metrics_dir or os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
    if path:
        os.makedirs(path, exist_ok=True)
        for name in os.listdir(path):
            if name.endswith(".db"):
                os.unlink(os.path.join(path, name))
    else:
        path = tempfile.mkdtemp(prefix="orgcast-metrics-")
        _made_metrics_dir.append(path)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    server.log.info("metrics of the workers in %s", path)


def child_exit(server, worker):
    """A worker is gone (exited, or killed): its live gauges (connected sockets) stop counting."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    for path in _made_metrics_dir:
        shutil.rmtree(path, ignore_errors=True)


def _raise_open_files(server):
    """Raise the open-file limit so worker_connections sockets can be opened.

    Many systems start services with a soft limit of 1,024 descriptors: the
    1,025th socket would fail with EMFILE long before worker_connections.
    Raise the soft limit toward the hard one (workers inherit it), and say
    so when even the hard limit is too low.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = worker_connections + 256  # sockets, plus the pool, logs and pipes
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < wanted:
            server.log.warning(
                "open-file limit is %d (hard): fewer sockets than ORGCAST_WORKER_CONNECTIONS=%d "
                "per worker can be open; raise it (ulimit -n, LimitNOFILE=)", target, worker_connections)


def post_worker_init(worker):
    """Tune the garbage collector once the worker has loaded the app.

    Every socket keeps tens of objects alive, and Python's default thresholds
    run full collections over all of them often: measured here, the pauses
    set the broadcast's p99 and cost a quarter of connect throughput
    (bench/README.md). Freeze what start-up built, and collect young objects
    in larger batches.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
    # The bus listeners run in every worker (app/__init__.py: Runtime).
    runtime = getattr(worker.wsgi, "runtime", None)
    if runtime is not None:
        runtime.start()


def worker_abort(worker):
    """A timed-out worker (WORKER TIMEOUT): log what each greenlet was doing."""
    from gevent.util import format_run_info

    worker.log.critical("worker %s timed out; its greenlets:\n%s", worker.pid, "\n".join(format_run_info()))


def worker_exit(server, worker):
    """Close the bus listeners' connections of a worker that stops."""
    runtime = getattr(getattr(worker, "wsgi", None), "runtime", None)
    if runtime is not None:
        runtime.stop()
