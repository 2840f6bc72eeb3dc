"""Run orgcast for development: ``make run``.

With no ``DATABASE_URL`` it starts a throwaway Postgres, creates the two tables
orgcast reads (``scripts/schema.sql``), loads the demo data (organization ``acme``, users alice
and bob) and turns the ``/demo`` page on; without ``ORGCAST_API_KEYS`` it
makes up a key for this run. Then it runs ``gunicorn -c gunicorn.conf.py
wsgi:app`` as a child, waits for ``/healthz`` and prints what to try.

Ctrl-C (SIGINT) or SIGTERM stops gunicorn, then the throwaway Postgres, whose
folder is removed. If gunicorn exits by itself, Postgres is stopped too and
this script exits with gunicorn's code. With ``DATABASE_URL`` set nothing is
created: it only serves.
"""

from __future__ import annotations

import argparse
import errno
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from throwaway import ThrowawayPostgres  # noqa: E402

from app.config import ConfigError, load_settings  # noqa: E402

GUNICORN = Path(sys.executable).parent / "gunicorn"
DEMO_TOKEN = "demo-alice-token"
DEMO_ORG = "acme"
START_TIMEOUT = 30.0


class Stop(Exception):
    """SIGINT or SIGTERM arrived: stop everything that was started."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise Stop(signum)


def say(text: str = "") -> None:
    """Print a line of this script's own output in one write.

    gunicorn writes to the same terminal or pipe. print() writes the text and
    the newline separately, and unbuffered (PYTHONUNBUFFERED) that is two
    writes: an access-log line could land between them, in the middle of the
    curl line. One write of a short line is never split.
    """
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def split_bind(bind: str) -> tuple[str, int]:
    """Return (host, port) of a HOST:PORT bind; a unix: bind is refused."""
    host, _, port = bind.rpartition(":")
    if bind.startswith("unix:") or not port.isdigit():
        raise ConfigError("BIND: `make run` needs HOST:PORT (a unix socket has no demo URL)")
    return host.strip("[]"), int(port)


def check_port_free(host: str, port: int) -> None:
    """Raise SystemExit with a clear message if HOST:PORT cannot be listened on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # As gunicorn does: a port left in TIME_WAIT by a previous run is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            why = "it is already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise SystemExit(f"orgcast: cannot listen on {host}:{port}: {why}. Stop the other "
                             f"server or choose another port, e.g. BIND={host}:{port + 1} "
                             "make run") from None


def url_host(host: str) -> str:
    """Return the host to put in URLs for a bind host (wildcards become loopback)."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def start_demo_database() -> ThrowawayPostgres:
    """Start a throwaway Postgres with the schema and the demo data loaded."""
    say("orgcast: DATABASE_URL is unset: starting a throwaway Postgres with demo data")
    pg = ThrowawayPostgres().start()
    try:
        pg.load(ROOT / "scripts" / "schema.sql")
        pg.load(ROOT / "scripts" / "demo_data.sql")
    except BaseException:
        pg.stop()
        raise
    say(f"  postgres:    {pg.dsn}  (folder {pg.root})")
    return pg


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait until ``url``/healthz answers 200; False if gunicorn exits or time runs out."""
    deadline = time.monotonic() + timeout
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # not via http_proxy
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with direct.open(url + "/healthz", timeout=1) as resp:
                if resp.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def stop_process(proc: subprocess.Popen[bytes], signum: int, timeout: float = 20.0) -> None:
    """Send ``signum`` to the process (by its PID), wait, then kill it if it lingers."""
    if proc.poll() is None:
        os.kill(proc.pid, signum)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            say(f"orgcast: gunicorn (pid {proc.pid}) did not stop in {timeout:.0f} s: killing it")
            proc.kill()
            proc.wait()


def print_banner(base: str, proc: subprocess.Popen[bytes], demo_page: bool, api_key: str | None,
                 generated_key: bool) -> None:
    """Print what to open and what to paste."""
    say()
    say(f"orgcast is serving at {base}  (gunicorn pid {proc.pid})")
    if demo_page:
        say(f"  demo page:   {base}/demo#token={DEMO_TOKEN}&organizationId={DEMO_ORG}")
    say(f"  demo token:  {DEMO_TOKEN}  (user alice, organization {DEMO_ORG}; "
        "demo-expired-token is expired)")
    if generated_key:
        say(f"  API key:     {api_key}  (made up for this run; set ORGCAST_API_KEYS to choose one)")
    # A key the user chose is not echoed: the curl reads it from the shell's environment.
    auth = (f"'Authorization: Bearer {api_key}'" if generated_key
            else '"Authorization: Bearer ${ORGCAST_API_KEYS%%,*}"')
    say(f"  publish a news event to organization {DEMO_ORG}:")
    say(f"curl -sS -i -X POST {base}/api/v1/organizations/{DEMO_ORG}/events -H {auth} "
        """-H 'Content-Type: application/json' """
        """-d '{"event": "news", "data": {"title": "Hello from curl"}}'""")
    say("Ctrl-C stops gunicorn and the throwaway Postgres.")
    say()


def main(argv: list[str] | None = None) -> int:
    """Run the development server; return the exit code."""
    parser = argparse.ArgumentParser(description="Run orgcast for development (make run).")
    parser.add_argument("--client-js", type=Path, default=None,
                        help="socket.io.min.js of the official client, served by /demo")
    args = parser.parse_args(argv)
    env = dict(os.environ)
    try:
        settings = load_settings(env)  # a bad value stops here, before anything starts
        host, port = split_bind(settings.bind)
    except ConfigError as exc:
        print(f"orgcast: configuration error: {exc}", file=sys.stderr)
        return 2
    check_port_free(host, port)
    base = f"http://{url_host(host)}:{port}"

    signal.signal(signal.SIGINT, _raise_stop)
    signal.signal(signal.SIGTERM, _raise_stop)
    pg: ThrowawayPostgres | None = None
    proc: subprocess.Popen[bytes] | None = None
    stop_signal = signal.SIGTERM
    try:
        demo = settings.database_url is None
        generated_key = demo and not settings.api_keys
        api_key = "dev-" + secrets.token_urlsafe(24) if generated_key else None
        if demo:
            pg = start_demo_database()
            env["DATABASE_URL"] = pg.dsn
            if api_key:
                env["ORGCAST_API_KEYS"] = api_key
            client_js = args.client_js.resolve() if args.client_js else None
            if client_js is not None and client_js.is_file():
                env["ORGCAST_DEMO_DIR"] = str(client_js.parent)
            else:
                say(f"orgcast: demo page off: socket.io client not found at {client_js} "
                    "(`make run` fetches it with npm)")
        # Its own session: the terminal's Ctrl-C reaches this script only,
        # which then stops gunicorn by its PID and Postgres after it.
        proc = subprocess.Popen([str(GUNICORN), "-c", "gunicorn.conf.py", "wsgi:app"],
                                cwd=ROOT, env=env, start_new_session=True)
        if not wait_healthy(base, proc, START_TIMEOUT):
            if proc.poll() is None:
                say(f"orgcast: {base}/healthz did not answer within {START_TIMEOUT:.0f} s")
                return 1
            say(f"orgcast: gunicorn exited with {proc.returncode} while starting")
            return proc.returncode
        if demo:
            print_banner(base, proc, "ORGCAST_DEMO_DIR" in env, api_key, generated_key)
        else:
            say(f"\norgcast is serving at {base}  (gunicorn pid {proc.pid}); Ctrl-C stops it\n")
        code = proc.wait()
        say(f"orgcast: gunicorn exited by itself with {code}")
        return code if code >= 0 else 128 - code
    except Stop as stop:
        say(f"\norgcast: {signal.Signals(stop.signum).name}: stopping")
        # SIGINT is gunicorn's quick shutdown, SIGTERM its graceful one: pass it on as is.
        stop_signal = signal.Signals(stop.signum)
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if proc is not None:
            stop_process(proc, stop_signal)
        if pg is not None:
            pg.stop()
            say(f"orgcast: throwaway Postgres stopped, {pg.root} removed")


if __name__ == "__main__":
    sys.exit(main())
