"""GET /metrics on the real gunicorn with two workers: the values after known
actions, summed over the workers whichever one answers the scrape, a killed
worker's sockets no longer counted, and no secret or id in any label."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from cluster import Cluster
from conftest import API_KEY, Server, base_env, publish
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(server: Server, headers: dict[str, str] | None = None) -> tuple[Series, str]:
    """Every sample of one scrape, by (name, labels), and the text itself."""
    # A new connection each time: gunicorn's kernel may give it to either worker.
    reply = requests.get(f"{server.url}/metrics", headers={"Connection": "close", **(headers or {})}, timeout=5)
    assert reply.status_code == 200, reply.text
    assert reply.headers["Content-Type"].startswith("text/plain")
    series: Series = {}
    for family in text_string_to_metric_families(reply.text):
        for sample in family.samples:
            series[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return series, reply.text


def value(series: Series, name: str, **labels: str) -> float:
    return series.get((name, frozenset(labels.items())), 0.0)


def wait_for_value(server: Server, name: str, expected: float, timeout: float = 10.0, **labels: str) -> Series:
    deadline = time.monotonic() + timeout
    while True:
        series, _ = scrape(server)
        if value(series, name, **labels) == expected:
            return series
        assert time.monotonic() < deadline, f"{name}{labels} is {value(series, name, **labels)}, not {expected}"
        time.sleep(0.1)


@pytest.fixture
def two_workers(postgres: Any, gunicorn_factory: Callable[..., Server]) -> Cluster:
    server = gunicorn_factory(base_env(postgres, WEB_CONCURRENCY="2", ORGCAST_LOG_LEVEL="debug"))
    found = Cluster([server], [2])
    found.wait_listening()
    return found


def test_metrics_add_up_over_the_workers_and_forget_a_killed_one(two_workers: Cluster, listen: Any) -> None:
    server = two_workers.servers[0]
    before, _ = scrape(server)
    placed = two_workers.spread(listen, {"token": "tok-alice", "organizationId": "org-a"}, per_worker=2)
    assert len(placed) == 4
    connects = sum(1 for line in server.output().splitlines() if "connect ok: socket" in line)
    for token in ("no-such-token-1", "no-such-token-2"):
        assert listen(server.url, auth={"token": token, "organizationId": "org-a"}).refusal_code == "token_invalid"
    assert listen(server.url, auth={"token": "tok-carol", "organizationId": "org-a"}).refusal_code == "forbidden"
    for n in range(3):
        assert publish(server, "org-a", "news", {"n": n}).status_code == 202
    for listener, _, _ in placed:
        for n in range(3):
            assert listener.wait_for("news") == {"n": n}

    wait_for_value(server, "orgcast_connected_sockets", 4)
    first, text = scrape(server)
    second, _ = scrape(server)
    for series in (first, second):  # the same sums, whichever worker served the scrape
        assert value(series, "orgcast_connected_sockets") == 4
        assert value(series, "orgcast_connection_attempts_total", result="ok") - value(
            before, "orgcast_connection_attempts_total", result="ok") == connects
        assert value(series, "orgcast_connection_attempts_total", result="token_invalid") - value(
            before, "orgcast_connection_attempts_total", result="token_invalid") == 2
        assert value(series, "orgcast_connection_attempts_total", result="forbidden") - value(
            before, "orgcast_connection_attempts_total", result="forbidden") == 1
        assert value(series, "orgcast_events_published_total", source="http") - value(
            before, "orgcast_events_published_total", source="http") == 3
        assert value(series, "orgcast_deliveries_total") - value(before, "orgcast_deliveries_total") == 12
        assert value(series, "orgcast_auth_duration_seconds_count") - value(
            before, "orgcast_auth_duration_seconds_count") == connects + 3
        assert value(series, "orgcast_bus_up", bus="postgres") == 1
        assert value(series, "orgcast_db_query_duration_seconds_count") > 0
    # Labels are codes, sources and backends: never a token, a user or an organization.
    assert not re.search(r"tok-|alice|carol|org-a|no-such-token", text)

    # SIGKILL one worker: its sockets leave the gauge; the totals keep what it counted.
    victim = placed[0][2]
    survivors = sum(1 for _, _, pid in placed if pid != victim)
    os.kill(victim, signal.SIGKILL)
    after = wait_for_value(server, "orgcast_connected_sockets", survivors)
    assert value(after, "orgcast_deliveries_total") - value(before, "orgcast_deliveries_total") == 12
    for listener, _, pid in placed:
        if pid == victim:
            listener.wait_for("disconnect")


def test_metrics_need_the_key_when_the_setting_says_so(postgres: Any, gunicorn_factory: Any) -> None:
    server = gunicorn_factory(base_env(postgres, ORGCAST_METRICS_AUTH="true"))
    reply = requests.get(f"{server.url}/metrics", timeout=5)
    assert reply.status_code == 401 and reply.json()["error"]["code"] == "unauthorized"
    reply = requests.get(f"{server.url}/metrics", headers={"Authorization": "Bearer wrong"}, timeout=5)
    assert reply.status_code == 401
    series, _ = scrape(server, {"Authorization": f"Bearer {API_KEY}"})
    assert value(series, "orgcast_bus_up", bus="postgres") == 1


def test_metrics_are_open_by_default(gunicorn_server: Server) -> None:
    series, text = scrape(gunicorn_server)
    assert "# TYPE orgcast_connection_attempts_total counter" in text
    assert "# TYPE orgcast_auth_duration_seconds histogram" in text
    assert value(series, "orgcast_build_info", version=__import__("app").__version__) == 1


def test_the_metrics_directory_is_emptied_at_start_and_a_temporary_one_removed(
        postgres: Any, gunicorn_factory: Any, tmp_path: Path) -> None:
    shared = tmp_path / "metrics"
    shared.mkdir()
    stale = shared / "counter_999999.db"
    stale.write_bytes(b"left by an earlier run")
    server = gunicorn_factory(base_env(postgres, ORGCAST_METRICS_DIR=str(shared)))
    assert not stale.exists()
    assert list(shared.glob("*.db"))  # this run's worker writes there
    server.stop()

    server = gunicorn_factory(base_env(postgres))
    made = re.search(r"metrics of the workers in (\S+)", server.output())
    assert made and Path(made.group(1)).is_dir()
    server.stop()
    assert not Path(made.group(1)).exists()
