"""The files of deploy/: the Grafana dashboard and the alert rules query only
metrics a real scrape has, and the systemd unit runs what the README says."""

from __future__ import annotations

import configparser
import json
import re

import pytest
import requests
import yaml
from conftest import ROOT, Server

DEPLOY = ROOT / "deploy"
METRIC = re.compile(r"\b(orgcast_[a-z_]+)\b")


@pytest.fixture(scope="module")
def scraped(gunicorn_server: Server) -> set[str]:
    """Every sample name of one scrape (histograms as _bucket, _count, _sum)."""
    text = requests.get(f"{gunicorn_server.url}/metrics", timeout=5).text
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_the_grafana_dashboard_queries_metrics_that_exist(scraped: set[str]) -> None:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) >= 10
    queried = {name for expr in exprs for name in METRIC.findall(expr)}
    assert queried, exprs
    assert queried <= scraped, sorted(queried - scraped)
    # Every metric family orgcast exports is on the dashboard.
    families = {re.sub(r"_(bucket|count|sum)$", "", n) for n in scraped if n.startswith("orgcast_")}
    shown = {re.sub(r"_(bucket|count|sum)$", "", n) for n in queried}
    assert families - shown <= {"orgcast_build_info", "orgcast_auth_duration_seconds_created"}, families - shown


def test_the_alert_rules_query_metrics_that_exist(scraped: set[str]) -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus-alerts.yml").read_text())
    alerts = {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]}
    # The failure modes the metrics show: down, not ready, bus down, refusal spikes.
    assert {"OrgcastDown", "OrgcastNotReady", "OrgcastBusDown", "OrgcastRefusalSpike"} <= alerts.keys()
    for rule in alerts.values():
        assert rule["annotations"]["summary"]
        names = set(METRIC.findall(rule["expr"]))
        assert names <= scraped, (rule["alert"], names - scraped)


def test_the_systemd_unit_runs_gunicorn_with_enough_descriptors() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(DEPLOY / "orgcast.service")
    service = unit["Service"]
    assert service["ExecStart"].endswith("gunicorn -c gunicorn.conf.py wsgi:app")
    assert int(service["LimitNOFILE"]) >= 16384
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["KillSignal"] == "SIGTERM"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
