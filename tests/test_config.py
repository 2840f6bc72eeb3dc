"""Settings: casts, defaults, redaction, start-up refusal, and the README table.

A bad value must stop start-up with one line naming the variable, never
half-configured, and never echo a secret (README, "Configuration").
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import GUNICORN, ROOT, base_env, wait_port
from throwaway import free_port

from app.config import (
    DEFAULT_MEMBERSHIP_SQL,
    DEFAULT_TOKEN_SQL,
    ConfigError,
    Secret,
    Settings,
    declarations,
    load_settings,
)

DSN = "postgresql://orgcast:db-password-4711@127.0.0.1:5432/orgcast"

# (variable, bad value, text that must not appear in the message: the value of a secret)
BAD_VALUES = [
    ("WEB_CONCURRENCY", "0", None),
    ("WEB_CONCURRENCY", "abc", None),
    ("WEB_CONCURRENCY", "-3", None),
    ("BIND", "nonsense", None),
    ("BIND", "127.0.0.1:99999", None),
    ("BIND", ":8000", None),
    ("ORGCAST_DB_TIMEOUT", "-1", None),
    ("ORGCAST_DB_TIMEOUT", "0", None),
    ("ORGCAST_DB_TIMEOUT", "soon", None),
    ("ORGCAST_DB_TIMEOUT", "nan", None),
    ("ORGCAST_DB_TIMEOUT", "inf", None),
    ("ORGCAST_AUTH_CACHE_TTL", "-5", None),
    ("ORGCAST_DB_POOL_SIZE", "0", None),
    ("ORGCAST_WORKER_CONNECTIONS", "many", None),
    ("ORGCAST_MAX_PAYLOAD", "1.5", None),
    ("ORGCAST_API_KEYS", "short", "short"),
    ("ORGCAST_API_KEYS", "a-long-enough-key-0123456789,tiny-secret-9", "tiny-secret-9"),
    ("ORGCAST_CORS_ORIGINS", "not-an-origin", None),
    ("ORGCAST_CORS_ORIGINS", "https://ok.example.com,ftp://files.example.com", None),
    ("ORGCAST_TRANSPORTS", "carrier-pigeon", None),
    ("ORGCAST_TRANSPORTS", "websocket,carrier-pigeon", None),
    ("ORGCAST_TOKEN_SQL", "SELECT user_id, true, expires FROM oauth_access_tokens", None),
    ("ORGCAST_TOKEN_SQL", "DELETE FROM oauth_access_tokens WHERE access_token = %(token)s", None),
    ("ORGCAST_MEMBERSHIP_SQL", "SELECT 1 FROM organization_users WHERE user_id = %(user_id)s",
     None),
    ("ORGCAST_LOG_LEVEL", "loud", None),
    ("ORGCAST_LOG_FORMAT", "xml", None),
    ("ORGCAST_ACCESS_LOG", "sometimes", None),
    ("ORGCAST_DB_TIMEZONE", "Mars/Olympus Mons", None),
    ("DATABASE_URL", "mysql-root-hunter2", "hunter2"),
    ("REDIS_URL", "http://:redis-hunter2@127.0.0.1:6379", "redis-hunter2"),
]


@pytest.mark.parametrize(("variable", "value", "secret"), BAD_VALUES)
def test_bad_value_raises_config_error_naming_the_variable(
        variable: str, value: str, secret: str | None) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"DATABASE_URL": DSN, variable: value})
    message = str(info.value)
    assert message.startswith(f"{variable}: "), message
    assert len(message.splitlines()) == 1
    assert "db-password-4711" not in message
    if secret is not None:
        assert secret not in message


def test_defaults() -> None:
    settings = load_settings({})
    assert settings.database_url is None
    assert settings.redis_url is None
    assert settings.bind == "127.0.0.1:8000"
    assert settings.web_concurrency == 1
    assert settings.api_keys == ()
    assert settings.cors_origins == ()
    assert settings.transports == ()
    assert settings.effective_transports == ("polling", "websocket")
    assert settings.db_timeout == 2.0
    assert settings.db_pool_size == 10
    assert settings.auth_cache_ttl == 10.0
    assert settings.max_payload == 1048576
    assert settings.token_sql == DEFAULT_TOKEN_SQL
    assert settings.membership_sql == DEFAULT_MEMBERSHIP_SQL
    assert settings.log_level == "info"
    assert settings.log_format == "text"
    assert settings.access_log is True


def test_blank_values_mean_default() -> None:
    assert load_settings({"BIND": "  ", "WEB_CONCURRENCY": ""}) == load_settings({})


def test_every_declared_default_passes_its_own_cast() -> None:
    environ = {env: default for env, default, _ in declarations()}
    assert load_settings(environ) == load_settings({})


@pytest.mark.parametrize(("environ", "attribute", "expected"), [
    ({"WEB_CONCURRENCY": " 4 "}, "web_concurrency", 4),
    ({"WEB_CONCURRENCY": "4"}, "effective_transports", ("websocket",)),
    ({"WEB_CONCURRENCY": "4", "ORGCAST_TRANSPORTS": "polling,websocket"}, "effective_transports",
     ("polling", "websocket")),
    ({"ORGCAST_TRANSPORTS": "WebSocket"}, "transports", ("websocket",)),
    ({"ORGCAST_DB_TIMEOUT": "0.25"}, "db_timeout", 0.25),
    ({"ORGCAST_AUTH_CACHE_TTL": "0"}, "auth_cache_ttl", 0.0),
    ({"ORGCAST_CORS_ORIGINS": "*"}, "cors_origins", ("*",)),
    ({"ORGCAST_CORS_ORIGINS": "https://a.example.com/, http://localhost:3000"}, "cors_origins",
     ("https://a.example.com", "http://localhost:3000")),
    ({"ORGCAST_API_KEYS": " key-0123456789abcdef , key-fedcba9876543210 "}, "api_keys",
     ("key-0123456789abcdef", "key-fedcba9876543210")),
    ({"ORGCAST_ACCESS_LOG": "off"}, "access_log", False),
    ({"ORGCAST_LOG_LEVEL": "DEBUG"}, "log_level", "debug"),
    ({"BIND": "unix:/run/orgcast.sock"}, "bind", "unix:/run/orgcast.sock"),
    ({"ORGCAST_TOKEN_SQL": "select u, a, e from t where k = %(token)s;"}, "token_sql",
     "select u, a, e from t where k = %(token)s"),
])
def test_casts(environ: dict[str, str], attribute: str, expected: object) -> None:
    assert getattr(load_settings(environ), attribute) == expected


def test_secrets_do_not_show_in_repr() -> None:
    settings = load_settings({"DATABASE_URL": DSN,
                              "ORGCAST_API_KEYS": "api-key-secret-0123456789"})
    assert isinstance(settings.database_url, Secret)
    assert "db-password-4711" not in repr(settings)
    assert "api-key-secret-0123456789" not in repr(settings)


def test_public_dict_redacts_secrets() -> None:
    settings = load_settings({
        "DATABASE_URL": DSN,
        "REDIS_URL": "redis://:redis-pass-0815@127.0.0.1:6379/0",
        "ORGCAST_API_KEYS": "api-key-secret-0123456789,api-key-secret-9876543210",
    })
    public = settings.public_dict()
    text = repr(public)
    for secret in ("db-password-4711", "redis-pass-0815", "api-key-secret-0123456789",
                   "api-key-secret-9876543210"):
        assert secret not in text
    assert public["DATABASE_URL"] == "postgresql://orgcast:**********@127.0.0.1:5432/orgcast"
    assert "127.0.0.1:6379" in public["REDIS_URL"]
    assert public["ORGCAST_API_KEYS"] == ["**********", "**********"]
    assert public["BIND"] == "127.0.0.1:8000"
    assert {env for env, _, _ in declarations()} <= set(public)


def test_public_dict_redacts_a_libpq_keyword_dsn() -> None:
    settings = load_settings({"DATABASE_URL": "host=db dbname=app password=kw-secret-31337"})
    assert "kw-secret-31337" not in repr(settings.public_dict())


# --- start-up: gunicorn refuses a bad configuration with one line ----------------


def _run_gunicorn(environ: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ORGCAST_", "REDIS_")) and k not in ("DATABASE_URL", "BIND",
                                                                     "WEB_CONCURRENCY")}
    env.update(environ)
    return subprocess.run([GUNICORN, "-c", "gunicorn.conf.py", "wsgi:app"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=20)


@pytest.mark.parametrize(("variable", "value"), [
    ("WEB_CONCURRENCY", "0"),
    ("BIND", "nonsense"),
    ("ORGCAST_DB_TIMEOUT", "-1"),
    ("ORGCAST_API_KEYS", "short-secret"),
    ("ORGCAST_CORS_ORIGINS", "not-an-origin"),
    ("ORGCAST_TRANSPORTS", "carrier-pigeon"),
    ("ORGCAST_TOKEN_SQL", "SELECT user_id, true, expires FROM oauth_access_tokens"),
    ("ORGCAST_LOG_LEVEL", "loud"),
    ("DATABASE_URL", "mysql-root-hunter2"),
    pytest.param("WEB_CONCURRENCY", "abc", marks=pytest.mark.xfail(
        strict=True, reason="gunicorn's own config module runs int(WEB_CONCURRENCY) on import, "
                            "before gunicorn.conf.py: a traceback, not our one line")),
])
def test_gunicorn_refuses_a_bad_value_with_one_line(variable: str, value: str) -> None:
    environ = {"DATABASE_URL": DSN, "BIND": f"127.0.0.1:{free_port()}", variable: value}
    result = _run_gunicorn(environ)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("orgcast: configuration error: "), lines[0]
    assert f" {variable}: " in lines[0]
    assert "short-secret" not in result.stderr + result.stdout
    assert "hunter2" not in result.stderr + result.stdout
    assert "db-password-4711" not in result.stderr + result.stdout


def test_gunicorn_refuses_to_start_without_database_url() -> None:
    result = _run_gunicorn({"BIND": f"127.0.0.1:{free_port()}"})
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "DATABASE_URL" in lines[0]


# --- the README's configuration table is the declarations -------------------------


def _readme_configuration_table(text: str) -> dict[str, tuple[str, str]]:
    """Return {variable: (doc cell, default cell)} from the tables under the
    Configuration heading."""
    lines = text.splitlines()
    start = level = None
    for i, line in enumerate(lines):
        match = re.match(r"^(#+)\s+(.*)$", line)
        if match and "configuration" in match.group(2).lower():
            start, level = i + 1, len(match.group(1))
            break
    assert start is not None and level is not None, "README.md has no Configuration heading"
    rows: dict[str, tuple[str, str]] = {}
    for line in lines[start:]:
        match = re.match(r"^(#+)\s", line)
        if match and len(match.group(1)) <= level:
            break
        if not line.lstrip().startswith("|"):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        name = re.fullmatch(r"`([A-Z][A-Z0-9_]*)`", cells[0]) if cells else None
        if name is None:
            continue  # header, separator or a row that is not a variable
        assert len(cells) >= 3, f"row of {name.group(1)} has no default column: {line}"
        assert name.group(1) not in rows, f"{name.group(1)} is in the table twice"
        rows[name.group(1)] = (cells[1].replace("\\|", "|"), cells[-1])
    return rows


def _default_of_cell(cell: str) -> str:
    """The first `code span` of a default cell; no span (e.g. "unset") means empty."""
    match = re.search(r"`([^`]*)`", cell)
    return match.group(1).replace("\\|", "|") if match else ""


def test_readme_configuration_table_matches_declarations() -> None:
    readme = Path(ROOT / "README.md")
    assert readme.exists(), "README.md is missing"
    table = _readme_configuration_table(readme.read_text())
    declared = {env: default for env, default, _ in declarations()}
    assert set(table) == set(declared), (
        f"missing from README: {sorted(set(declared) - set(table))}; "
        f"not declared: {sorted(set(table) - set(declared))}")
    wrong = {env: (_default_of_cell(table[env][1]), default) for env, default in declared.items()
             if _default_of_cell(table[env][1]) != default}
    assert not wrong, f"README default != declared default: {wrong}"
    docs = {env: " ".join(doc.split()) for env, _, doc in declarations()}
    stale = sorted(env for env, doc in docs.items() if table[env][0] != doc)
    assert not stale, (f"README meaning differs from the declaration for {stale}: "
                       "run .venv/bin/python scripts/gen_config_table.py --update")


def test_settings_fields_all_declared() -> None:
    names = [env for env, _, _ in declarations()]
    assert len(names) == len(set(names))
    assert len(names) == len(Settings.__dataclass_fields__)
    assert all(doc for _, _, doc in declarations())


def test_gunicorn_raises_a_low_open_file_limit(postgres: Any, tmp_path: Path) -> None:
    """With a soft limit of 1,024 descriptors the 1,025th socket would fail
    long before ORGCAST_WORKER_CONNECTIONS: the worker runs with more."""
    prlimit = shutil.which("prlimit")
    assert prlimit, "prlimit (util-linux) is needed"
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("ORGCAST_")},
           **base_env(postgres), "BIND": f"127.0.0.1:{port}", "ORGCAST_WORKER_CONNECTIONS": "3000"}
    log = tmp_path / "gunicorn.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([prlimit, "--nofile=1024:2048", GUNICORN, "-c", "gunicorn.conf.py", "wsgi:app"],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_port(port, time.monotonic() + 20, proc)
        assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
        worker = int(subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True,
                                    check=True).stdout.split()[0])
        limits = Path(f"/proc/{worker}/limits").read_text()
        soft = int(next(line for line in limits.splitlines() if line.startswith("Max open files")).split()[3])
        assert soft == 2048, limits
        assert "open-file limit is 2048 (hard)" in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


def test_the_settings_given_to_create_app_set_the_transport_s_limits(postgres: Any) -> None:
    """One Settings, passed down (issue 18): the worker no longer reads the environment again."""
    from app import create_app
    from app.serving import OrgcastHandler
    from app.transport.connection import Connection
    from app.transport.websocket import WebSocket

    settings = load_settings(base_env(postgres, ORGCAST_SEND_BUFFER="12345", ORGCAST_MAX_PAYLOAD="2345",
                                      ORGCAST_HEADER_TIMEOUT="7", ORGCAST_BODY_TIMEOUT="3"))
    saved = (Connection.max_buffer, WebSocket.max_message, OrgcastHandler.header_timeout, OrgcastHandler.body_timeout)
    try:
        create_app(settings)
        assert (WebSocket.max_buffer, WebSocket.max_message) == (12345, 2345)
        assert (OrgcastHandler.header_timeout, OrgcastHandler.body_timeout) == (7.0, 3.0)
    finally:
        Connection.max_buffer, WebSocket.max_message, OrgcastHandler.header_timeout, OrgcastHandler.body_timeout = saved
