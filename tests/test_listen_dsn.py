"""The Postgres bus's LISTEN connection (contract §3, issue 22): ``ORGCAST_LISTEN_DATABASE_URL``
gives it a direct connection of its own, and a LISTEN that hears nothing of what is notified
(PgBouncer in transaction pooling accepts LISTEN and then drops it) is said, not silent."""

from __future__ import annotations

import time
from typing import Any

import pytest
import requests
from conftest import base_env, fresh_database, publish, start_gunicorn

pytestmark = pytest.mark.slow


def test_the_listen_connection_can_be_a_dsn_of_its_own(postgres: Any, tmp_path: Any, listen: Any) -> None:
    direct = f"host=127.0.0.1 port={postgres.port} user=orgcast dbname=orgcast application_name=direct"
    server = start_gunicorn(base_env(postgres, ORGCAST_LISTEN_DATABASE_URL=direct, WEB_CONCURRENCY="2"), tmp_path)
    try:
        listener = listen(server.url, auth={"token": "tok-bob", "organizationId": "org-a"})
        assert publish(server, "org-a", "news", "through the direct listener").status_code == 202
        assert listener.wait_for("news") == "through the direct listener"
    finally:
        server.stop()


def test_a_listen_connection_that_hears_nothing_makes_readyz_say_why(postgres: Any, tmp_path: Any) -> None:
    """Its notifications never come back (here: it listens on another database, as a
    transaction pool's server connection would): /readyz answers 503 naming the setting."""
    with fresh_database() as elsewhere:
        server = start_gunicorn(base_env(postgres, ORGCAST_LISTEN_DATABASE_URL=elsewhere.dsn), tmp_path)
        try:
            deadline = time.monotonic() + 40
            while True:
                reply = requests.get(server.url + "/readyz", timeout=5)
                if reply.status_code == 503:
                    break
                assert time.monotonic() < deadline, "a deaf LISTEN connection was never noticed"
                time.sleep(0.5)
            assert "ORGCAST_LISTEN_DATABASE_URL" in reply.json()["checks"]["bus"]["error"]
            assert "ORGCAST_LISTEN_DATABASE_URL" in server.output()
        finally:
            server.stop()
