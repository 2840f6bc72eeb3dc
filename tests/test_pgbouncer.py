"""A real PgBouncer in transaction pooling in front of Postgres (contract §3, issue 22), as the
README configures it: lookups, publishes, presence and recovery go through the pool; the bus
listens on ``ORGCAST_LISTEN_DATABASE_URL``, a direct connection. Without that setting the pool
swallows LISTEN, and ``/readyz`` says so instead of losing events in silence."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import API_KEY, base_env, publish, start_gunicorn, unique
from throwaway import free_port, terminate, wait_port

pytestmark = pytest.mark.slow

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


class PgBouncer:
    """pgbouncer in transaction pooling mode on a free port, in front of ``postgres``."""

    def __init__(self, postgres: Any) -> None:
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="orgcast-pgbouncer-"))
        (self.root / "users.txt").write_text('"orgcast" ""\n')
        (self.root / "pgbouncer.ini").write_text(f"""
[databases]
orgcast = host=127.0.0.1 port={postgres.port} dbname=orgcast user=orgcast
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {self.root}/users.txt
pool_mode = transaction
; orgcast sends statement_timeout (and TimeZone) as connection options (README)
ignore_startup_parameters = options
max_client_conn = 500
default_pool_size = 20
logfile = {self.root}/pgbouncer.log
""")
        command = [PGBOUNCER, str(self.root / "pgbouncer.ini")]
        if os.geteuid() == 0:  # pgbouncer refuses to run as root
            entry = pwd.getpwnam("postgres")
            for path in (self.root, *self.root.iterdir()):
                os.chown(path, entry.pw_uid, entry.pw_gid)
            command = ["runuser", "-u", "postgres", "--", *command]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        try:
            wait_port(self.port, time.monotonic() + 15, self.proc)
        except BaseException:
            found = self.root / "pgbouncer.log"
            log = found.read_text(errors="replace") if found.exists() else ""
            self.stop()
            pytest.fail(f"pgbouncer did not start: {log[-2000:]}")
        self.dsn = f"postgresql://orgcast@127.0.0.1:{self.port}/orgcast"

    def stop(self) -> None:
        terminate(self.proc)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def pgbouncer(postgres: Any) -> Iterator[PgBouncer]:
    if not os.path.exists(PGBOUNCER):
        pytest.fail("pgbouncer is not installed (make test installs it)")
    bouncer = PgBouncer(postgres)
    yield bouncer
    bouncer.stop()


def through(bouncer: PgBouncer, postgres: Any, **more: str) -> dict[str, str]:
    env = base_env(postgres, WEB_CONCURRENCY="2", **more)
    env["DATABASE_URL"] = bouncer.dsn
    return env


def test_two_workers_through_a_transaction_pool_with_a_direct_listen(pgbouncer: PgBouncer, postgres: Any,
                                                                     tmp_path: Path, listen: Any) -> None:
    direct = f"host=127.0.0.1 port={postgres.port} user=orgcast dbname=orgcast"
    server = start_gunicorn(through(pgbouncer, postgres, ORGCAST_LISTEN_DATABASE_URL=direct), tmp_path)
    try:
        deadline = time.monotonic() + 20  # both workers up (readiness needs one), each through the pool
        while server.output().count("postgres bus listening") < 2:
            assert time.monotonic() < deadline, server.output()[-2000:]
            time.sleep(0.05)
        assert requests.get(server.url + "/readyz", timeout=5).status_code == 200
        # Enough sockets that both workers hold some (each connect is a lookup through the pool).
        sockets = [listen(server.url, auth={"token": token, "organizationId": "org-a"})
                   for token in ("tok-bob", "tok-alice") * 4]
        assert all(s.connect_error is None for s in sockets)
        values = [unique("pooled") for _ in range(5)]
        for value in values:
            assert publish(server, "org-a", "news", value).status_code == 202
        for s in sockets:
            assert [s.wait_for("news") for _ in values] == values
        # pg_notify through the pool too: its NOTIFY is delivered when that transaction commits.
        value = unique("pg-notify")
        subprocess.run([str(postgres.bindir / "psql"), pgbouncer.dsn, "-v", "ON_ERROR_STOP=1", "-q", "-c",
                        "SELECT pg_notify('orgcast', '{\"room\": \"organization.org-a\", \"event\": \"news\", "
                        f"\"data\": \"{value}\"}}')"], check=True, capture_output=True)
        for s in sockets:
            assert s.wait_for("news") == value
        # Presence is kept in tables written through the pool, by both workers.
        reply = requests.get(f"{server.url}/api/v1/organizations/org-a/presence",
                             headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5)
        assert reply.status_code == 200, reply.text
        assert {"userId": "bob", "sockets": 4} in reply.json()["users"], reply.json()
    finally:
        server.stop()
    assert "Traceback" not in server.output()


def test_without_a_direct_listen_the_pool_is_named_not_silent(pgbouncer: PgBouncer, postgres: Any,
                                                              tmp_path: Path) -> None:
    server = start_gunicorn(through(pgbouncer, postgres), tmp_path, ready=False)
    try:
        deadline = time.monotonic() + 40
        while True:
            reply = requests.get(server.url + "/readyz", timeout=5)
            if reply.status_code == 503 and "ORGCAST_LISTEN_DATABASE_URL" in reply.text:
                break
            assert time.monotonic() < deadline, f"a LISTEN through PgBouncer was never noticed: {reply.text}"
            time.sleep(0.5)
        assert "ORGCAST_LISTEN_DATABASE_URL" in server.output()
    finally:
        server.stop()
