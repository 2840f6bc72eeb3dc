"""No token or API key ever reaches a log line (README, "Deployment"), gunicorn's access
log included, whatever way the client sends it, and whatever it sends."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from conftest import Listener, Server, base_env, publish, raw_exchange
from throwaway import ThrowawayPostgres

from app.log import REDACTED, redact

# --- redact() on examples -------------------------------------------------------


@pytest.mark.parametrize(("text", "secret", "kept"), [
    ("GET /socket.io/?EIO=4&token=s3cr3t-q&organizationId=42 HTTP/1.1", "s3cr3t-q",
     "GET /socket.io/?EIO=4&token=[REDACTED]&organizationId=42 HTTP/1.1"),
    ("/socket.io/?token=s3cr3t-first", "s3cr3t-first", "/socket.io/?token=[REDACTED]"),
    ("/cb?access_token=s3cr3t-at&x=1", "s3cr3t-at", "/cb?access_token=[REDACTED]&x=1"),
    ("/x?TOKEN=s3cr3t-upper", "s3cr3t-upper", "/x?TOKEN=[REDACTED]"),
    ("token=s3cr3t-bare", "s3cr3t-bare", "token=[REDACTED]"),
    ("/x?api_key=s3cr3t-ak", "s3cr3t-ak", "/x?api_key=[REDACTED]"),
    ("/x?a=1;token=s3cr3t-semi", "s3cr3t-semi", "/x?a=1;token=[REDACTED]"),
    ("Authorization: Bearer s3cr3t.jwt.sig", "s3cr3t.jwt.sig", "Authorization: Bearer [REDACTED]"),
    ("authorization: bearer s3cr3t-lower", "s3cr3t-lower", "authorization: bearer [REDACTED]"),
    ("HTTP_AUTHORIZATION='Bearer s3cr3t-env'", "s3cr3t-env", "HTTP_AUTHORIZATION='Bearer [REDACTED]'"),
    ("{'token': 's3cr3t-dict', 'organizationId': '42'}", "s3cr3t-dict",
     "{'token': '[REDACTED]', 'organizationId': '42'}"),
    ('{"token": "s3cr3t-json", "organizationId": "42"}', "s3cr3t-json",
     '{"token": "[REDACTED]", "organizationId": "42"}'),
    ('40{"token":"s3cr3t-packet","organizationId":"org-a"}', "s3cr3t-packet",
     '40{"token":"[REDACTED]","organizationId":"org-a"}'),
    ("{'auth': {'token': 's3cr3t-nested'}}", "s3cr3t-nested", "{'auth': {'token': '[REDACTED]'}}"),
    ("{'HTTP_AUTHORIZATION': 'Bearer s3cr3t-hdr'}", "s3cr3t-hdr",
     "{'HTTP_AUTHORIZATION': 'Bearer [REDACTED]'}"),
    ("{'access_token': 's3cr3t-acc'}", "s3cr3t-acc", "{'access_token': '[REDACTED]'}"),
    ("postgresql://orgcast:s3cr3t-pw@db.internal:5432/app", "s3cr3t-pw",
     "postgresql://orgcast:[REDACTED]@db.internal:5432/app"),
    ("connecting to redis://:s3cr3t-redis@127.0.0.1:6379/0 failed", "s3cr3t-redis",
     "connecting to redis://:[REDACTED]@127.0.0.1:6379/0 failed"),
    ("Invalid HTTP version: 'GET /socket.io/?token=s3cr3t-raw HTTP/9.9\\r\\n'", "s3cr3t-raw",
     "Invalid HTTP version: 'GET /socket.io/?token=[REDACTED] HTTP/9.9\\r\\n'"),
    ("b'GET /?organizationId=1&token=s3cr3t-bytes HTTP/1.1'", "s3cr3t-bytes",
     "b'GET /?organizationId=1&token=[REDACTED] HTTP/1.1'"),
])
def test_redact(text: str, secret: str, kept: str) -> None:
    out = redact(text)
    assert secret not in out
    assert out == kept


@pytest.mark.parametrize("text", [
    "", "GET /healthz HTTP/1.1", "organizationId=42&room=organization.42",
    "postgresql://orgcast@127.0.0.1/orgcast", "tokens are checked", "a=1&token=",
])
def test_redact_leaves_harmless_text_alone(text: str) -> None:
    assert redact(text) == text


def test_redact_is_idempotent() -> None:
    once = redact("GET /?token=abc HTTP/1.1 Authorization: Bearer xyz")
    assert redact(once) == once
    assert once.count(REDACTED) == 2


# --- the real gunicorn: every way a secret can arrive ----------------------------


def _secret(kind: str) -> str:
    # Distinctive, at most 40 characters (oauth_access_tokens.access_token).
    return f"tok-secret-{kind}-{uuid.uuid4().hex[:18]}"


@pytest.fixture
def secrets(postgres: ThrowawayPostgres) -> Iterator[dict[str, str]]:
    """Valid tokens of alice (org-a) in the shared database, unique to this test."""
    found = {kind: _secret(kind) for kind in (
        "ws-query", "poll-query", "ws-auth", "poll-auth", "bearer", "cached")}
    found.update({kind: _secret(kind) for kind in (
        "refused-query", "refused-auth", "refused-bearer", "raw-line", "raw-header",
        "raw-long", "access-param")})
    found["api-key"] = f"api-secret-{uuid.uuid4().hex}"
    found["wrong-api-key"] = f"wrong-api-secret-{uuid.uuid4().hex}"
    valid = ("ws-query", "poll-query", "ws-auth", "poll-auth", "bearer", "cached")
    rows = ", ".join(f"('{found[k]}', 'web', 'alice', LOCALTIMESTAMP + INTERVAL '1 day')"
                     for k in valid)
    postgres.psql("INSERT INTO oauth_access_tokens (access_token, client_id, user_id, expires) "
                  f"VALUES {rows}")
    try:
        yield found
    finally:
        listed = ", ".join(f"'{found[k]}'" for k in valid)
        postgres.psql(f"DELETE FROM oauth_access_tokens WHERE access_token IN ({listed})")


def _connect(server: Server, url: str | None = None, **kwargs: Any) -> Listener:
    listener = Listener().connect(url or server.url, **kwargs)
    return listener


def _exercise(server: Server, s: dict[str, str]) -> None:
    """Send every secret every way a client or backend would (and some they should not)."""
    opened: list[Listener] = []
    try:
        # Accepted: the token in the query string (websocket, polling), in the
        # auth payload (websocket, polling) and in Authorization: Bearer.
        for kind, transports in (("ws-query", ["websocket"]), ("poll-query", ["polling"])):
            listener = _connect(server, f"{server.url}?token={s[kind]}&organizationId=org-a",
                                transports=transports)
            assert listener.connect_error is None, (kind, listener.connect_error)
            opened.append(listener)
        for kind, transports in (("ws-auth", ["websocket"]), ("poll-auth", ["polling"])):
            listener = _connect(server, auth={"token": s[kind], "organizationId": "org-a"},
                                transports=transports)
            assert listener.connect_error is None, (kind, listener.connect_error)
            opened.append(listener)
        listener = _connect(server, headers={"Authorization": f"Bearer {s['bearer']}"},
                            auth={"organizationId": "org-a"})
        assert listener.connect_error is None, listener.connect_error
        opened.append(listener)
        # The same token twice: the second time from the cache.
        for _ in range(2):
            listener = _connect(server, auth={"token": s["cached"], "organizationId": "org-a"})
            assert listener.connect_error is None
            opened.append(listener)

        # Refused: unknown tokens, each way.
        refused = [
            _connect(server, f"{server.url}?token={s['refused-query']}&organizationId=org-a"),
            _connect(server, auth={"token": s["refused-auth"], "organizationId": "org-a"},
                     transports=["polling"]),
            _connect(server, headers={"Authorization": f"Bearer {s['refused-bearer']}"},
                     auth={"organizationId": "org-a"}),
        ]
        for listener in refused:
            assert listener.refusal_code == "token_invalid", listener.connect_error
            listener.close()

        # The server API with the key, and with a wrong one.
        assert publish(server, "org-a", "news", {"n": 1}, key=s["api-key"]).status_code == 202
        for listener in opened:
            assert listener.wait_for("news") == {"n": 1}
        assert publish(server, "org-a", "news", {}, key=s["wrong-api-key"]).status_code == 401
        with requests.get(f"{server.url}/admin/config", timeout=5,
                          headers={"Authorization": f"Bearer {s['api-key']}"}) as reply:
            assert reply.status_code in (200, 404)
        with requests.post(f"{server.url}/api/v1/users/alice/events", timeout=5,
                           data=b"not json",
                           headers={"Authorization": f"Bearer {s['api-key']}"}) as reply:
            assert reply.status_code == 400
        with requests.get(f"{server.url}/healthz?access_token={s['access-param']}",
                          timeout=5) as reply:
            assert reply.status_code == 200
        # The operator routes: nothing secret in what they answer either.
        for path in ("/metrics", "/admin/stats", "/admin/config"):
            with requests.get(server.url + path, timeout=5,
                              headers={"Authorization": f"Bearer {s['api-key']}"}) as reply:
                assert reply.status_code == 200, (path, reply.text)
                leaked = [kind for kind, secret in s.items() if secret in reply.text]
                assert not leaked, (path, leaked)
    finally:
        for listener in opened:
            listener.close()

    # Malformed requests, written by hand: the request line, a header, a
    # request line over the limit, each carrying a token.
    raw_exchange(server, f"GET /socket.io/?token={s['raw-line']} HTTP/9.9\r\n\r\n".encode())
    raw_exchange(server, f"GET /socket.io/?token={s['raw-line']}&organizationId=org-a HTTP/1.1 x\r\n"
                 "\r\n".encode())
    raw_exchange(server, f"GET /socket.io/?EIO=4&transport=polling&token={s['raw-header']} HTTP/1.1\r\n"
                 "Host: x\r\nThis Is Not A Header\r\n\r\n".encode())
    raw_exchange(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
         + s["raw-header"].encode() + b"\r\nX-Bad: \x00\x01\r\nGarbage\r\n\r\n")
    raw_exchange(server, f"GET /socket.io/?token={s['raw-long']}&pad={'a' * 9000} HTTP/1.1\r\n"
                 "Host: x\r\n\r\n".encode())
    raw_exchange(server, f"POST /api/v1/organizations/org-a/events?token={s['raw-line']} HTTP/1.1\r\n"
                 f"Host: x\r\nAuthorization: Bearer {s['api-key']}\r\n"
                 "Content-Length: 5\r\n\r\n{".encode())


@pytest.mark.parametrize(("level", "log_format"), [("info", "text"), ("debug", "json")])
def test_no_secret_in_any_log_line(secrets: dict[str, str], postgres: ThrowawayPostgres,
                                   gunicorn_factory: Any, level: str, log_format: str) -> None:
    server = gunicorn_factory(base_env(
        postgres, ORGCAST_API_KEYS=secrets["api-key"], ORGCAST_AUTH_CACHE_TTL="60",
        ORGCAST_LOG_LEVEL=level, ORGCAST_LOG_FORMAT=log_format))
    _exercise(server, secrets)
    server.stop()
    output = server.output()

    if log_format == "json":
        # One JSON object a line, from gunicorn, the app and the libraries alike.
        records = [json.loads(line) for line in output.splitlines() if line.strip()]
        assert all({"time", "level", "logger", "message"} <= r.keys() for r in records)
        # Each connect attempt and publication has its line, with its context as fields.
        attempts = [r for r in records if r["message"].startswith(("connect ok:", "connect refused:"))]
        assert {r["code"] for r in attempts} >= {"ok", "token_invalid"}
        assert all(r["address"] and r["latency_ms"] is not None for r in attempts)
        assert all(r["socket_id"] and r["user_id"] == "alice" for r in attempts if r["code"] == "ok")
        deliveries = [r for r in records if r["message"].startswith("delivered ")]
        assert any(r["event"] == "news" and r["source"] == "http" and r["request_id"] and r["recipients"] >= 1
                   for r in deliveries)
        # (the messages as written, then every field of every record: no secret in either)
        output = "\n".join(r["message"] + r.get("exception", "") for r in records) + "\n" + "\n".join(
            json.dumps(r) for r in records)

    leaked = {kind: value for kind, value in secrets.items() if value in output}
    assert not leaked, f"secrets in the log: {sorted(leaked)}\n{output[-3000:]}"
    # The hexadecimal tails alone would betray a token cut in the middle.
    assert not [k for k, v in secrets.items() if v[-18:] in output]

    # One line per connect attempt and per publication (app log).
    assert "connect ok: socket " in output and "connect refused: token_invalid, address 127.0.0.1" in output
    assert re.search(r"delivered news \[[0-9a-f]{16}\] from http to organization\.org-a: \d+ sockets", output)
    # The access log was written, request lines included, with tokens redacted.
    assert f"token={REDACTED}&organizationId=org-a" in output
    assert "GET /socket.io/?" in output
    assert "POST /api/v1/organizations/org-a/events" in output
    assert f"/healthz?access_token={REDACTED}" in output
    assert " 401 " in output and " 202 " in output
    # Requests gevent refuses are logged too, redacted, and without a traceback.
    assert f'"GET /socket.io/?token={REDACTED} HTTP/9.9" 400' in output
    assert "Traceback" not in output


def test_library_log_floods_are_capped_and_counted() -> None:
    """A client sending garbage makes engineio log a traceback per packet: the
    filter lets a burst through, drops the rest, then says how many it dropped."""
    import logging

    from app.log import RateLimitFilter

    limiter = RateLimitFilter(burst=3, period=0.2)

    def record(n: int) -> logging.LogRecord:
        return logging.LogRecord("engineio", logging.ERROR, __file__, 1, f"garbage {n}", None, None)

    passed = [limiter.filter(record(n)) for n in range(10)]
    assert passed == [True] * 3 + [False] * 7
    deadline = time.monotonic() + 5
    while time.monotonic() - limiter._window_start < limiter.period and time.monotonic() < deadline:
        time.sleep(0.01)  # the window is time itself: wait it out, bounded
    late = record(99)
    assert limiter.filter(late)
    assert "dropped 7 similar messages" in late.getMessage()


def test_tracebacks_are_capped_per_place() -> None:
    """No client can make orgcast write tracebacks at will: a few a minute from
    each place; other places keep theirs; records without one are untouched."""
    import logging
    import sys

    from app.log import TracebackLimitFilter

    limiter = TracebackLimitFilter(burst=3, period=0.2)
    try:
        raise ValueError("boom")
    except ValueError:
        exc_info = sys.exc_info()

    def record(line: int, exc: bool = True) -> logging.LogRecord:
        return logging.LogRecord("app.x", logging.ERROR, __file__, line, "failed", None,
                                 exc_info if exc else None)

    assert [limiter.filter(record(10)) for _ in range(6)] == [True] * 3 + [False] * 3
    assert limiter.filter(record(20))  # another place
    assert all(limiter.filter(record(10, exc=False)) for _ in range(10))
    (window_start, _, _) = limiter._places[("app.x", __file__, 10)]
    deadline = time.monotonic() + 5
    while time.monotonic() - window_start < limiter.period and time.monotonic() < deadline:
        time.sleep(0.01)  # the window is time itself: wait it out, bounded
    late = record(10)
    assert limiter.filter(late)
    assert "dropped 3 similar tracebacks" in late.getMessage()


@pytest.mark.parametrize("fmt", ['%(h)s "%(r)s" %(s)s %(b)s %(M)sms "%(a)s"',
                                 '%(h)s %(m)s %(q)s "%({authorization}i)s" %({X-Missing}i)s %(zz)s %(L)s'])
def test_access_lines_are_gunicorn_s_own_with_secrets_redacted(fmt: str) -> None:
    """The atoms built only when the format names them (serving.AccessAtoms) make gunicorn's
    line, any format's, with every secret redacted and a missing atom '-'."""
    import datetime
    import io

    from gunicorn.config import Config
    from gunicorn.glogging import Logger
    from gunicorn.workers.ggevent import GeventResponse

    from app.serving import RedactingLogger

    secret = "tok-" + "9" * 30
    environ = {"REMOTE_ADDR": "10.0.0.7", "REQUEST_METHOD": "GET", "SERVER_PROTOCOL": "HTTP/1.1",
               "RAW_URI": f"/socket.io/?EIO=4&token={secret}", "QUERY_STRING": f"EIO=4&token={secret}",
               "PATH_INFO": "/socket.io/", "HTTP_USER_AGENT": 'curl "8"', "HTTP_AUTHORIZATION": f"Bearer {secret}"}
    headers = [("User-Agent", 'curl "8"'), ("Authorization", f"Bearer {secret}")]
    lines = []
    for cls in (Logger, RedactingLogger):
        cfg = Config()
        cfg.set("accesslog", "-")
        cfg.set("access_log_format", fmt)
        logger = cls(cfg)
        out = io.StringIO()
        for handler in logger.access_log.handlers:
            handler.stream = out
        logger.access(GeventResponse("202 Accepted", [], 31), headers, environ, datetime.timedelta(seconds=0.0123))
        line = [text for text in out.getvalue().splitlines() if "10.0.0.7" in text][-1]
        lines.append(line[line.index("10.0.0.7"):])  # (after any prefix another test's set-up left)
    plain, ours = lines
    assert secret in plain and secret not in ours and REDACTED in ours
    # the same line as gunicorn's where no secret is
    assert [w for w in ours.split() if REDACTED not in w] == [w for w in plain.split() if secret not in w]
