"""orgcast behind a real nginx, configured with the block README.md documents.

The nginx configuration is README's ```nginx block under "Behind nginx",
changed only where a test must (listen address, upstream port, access log
path): a broken block in the README fails these tests. nginx runs from the
Debian package (/usr/sbin/nginx, installed by ``make test``) in the
foreground with everything under the test's tmp folder; it never reads the
system configuration nor listens on port 80.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import API_KEY, ROOT, Server, base_env, unique
from throwaway import ThrowawayPostgres, free_port, terminate, wait_port

pytestmark = pytest.mark.usefixtures("no_leaked_threads")

NGINX = "/usr/sbin/nginx"


def readme_nginx_block() -> str:
    """The ```nginx fenced block of README's "Behind nginx" section."""
    readme = (ROOT / "README.md").read_text()
    assert "### Behind nginx" in readme, "README.md has no 'Behind nginx' section"
    section = readme.split("### Behind nginx", 1)[1].split("\n## ", 1)[0]
    found = re.search(r"^```nginx\n(.*?)^```", section, re.S | re.M)
    assert found, "no ```nginx block under 'Behind nginx' in README.md"
    return found.group(1)


def replace_once(text: str, pattern: str, replacement: str) -> str:
    """Replace the one match of ``pattern``; fail if README's block has none or several."""
    new, count = re.subn(pattern, replacement, text, flags=re.M)
    assert count == 1, f"expected one {pattern!r} in README's nginx block, found {count}"
    return new


def nginx_conf(tmp: Path, port: int, upstream_ports: list[int]) -> str:
    """A complete nginx.conf around README's block, all paths under ``tmp``."""
    block = readme_nginx_block()
    block = replace_once(block, r"^(\s*)listen\s+443\s+ssl;", rf"\g<1>listen 127.0.0.1:{port};")
    servers = " ".join(f"server 127.0.0.1:{p};" for p in upstream_ports)
    block = replace_once(block, r"^(\s*)server\s+127\.0\.0\.1:8000;", rf"\g<1>{servers}")
    # The path only: the format name stays README's.
    block = replace_once(block, r"^(\s*access_log\s+)/\S+", rf"\g<1>{tmp}/access.log")
    temp_paths = "\n".join(f"    {kind}_temp_path {tmp}/{kind}_temp;"
                           for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    # As root, nginx's workers would run as nobody, who cannot enter pytest's
    # 0700 tmp folders: bodies past the memory buffers (temp files) got 500.
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"""daemon off;
{user}master_process on;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log;
# Open websockets would hold a graceful shutdown forever.
worker_shutdown_timeout 5s;
events {{
    worker_connections 256;
}}
http {{
{temp_paths}
    access_log off;

{block}
}}
"""


@dataclass
class Nginx:
    """A foreground nginx master started by the test."""

    proc: subprocess.Popen[bytes]
    port: int
    tmp: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def access_log(self) -> str:
        path = self.tmp / "access.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def error_log(self) -> str:
        texts = [p.read_text(errors="replace") for p in (self.tmp / "error.log", self.tmp / "stderr.log")
                 if p.exists()]
        return "".join(texts)

    def stop(self) -> None:
        """Graceful quit (SIGQUIT), by PID; kill after a deadline."""
        terminate(self.proc, 10, signal.SIGQUIT)


def start_nginx(tmp: Path, upstream_port: int | list[int], timeout: float = 10.0) -> Nginx:
    assert Path(NGINX).exists(), "nginx is required (Debian package nginx; make test installs it)"
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = tmp / "nginx.conf"
    ports = upstream_port if isinstance(upstream_port, list) else [upstream_port]
    conf.write_text(nginx_conf(tmp, port, ports))
    checked = subprocess.run([NGINX, "-t", "-q", "-c", str(conf), "-p", f"{tmp}/"],
                             capture_output=True, text=True, timeout=timeout)
    assert checked.returncode == 0, f"nginx -t refused README's block:\n{checked.stderr}"
    with open(tmp / "stderr.log", "wb") as err:
        proc = subprocess.Popen([NGINX, "-c", str(conf), "-p", f"{tmp}/"],
                                stdout=subprocess.DEVNULL, stderr=err)
    nginx = Nginx(proc, port, tmp)
    try:
        wait_port(port, time.monotonic() + timeout, proc)
    except (TimeoutError, RuntimeError) as exc:
        nginx.stop()
        pytest.fail(f"nginx did not start: {exc}\n{nginx.error_log()}")
    return nginx


@pytest.fixture
def behind_nginx(postgres: ThrowawayPostgres, gunicorn_factory: Any,
                 tmp_path: Path) -> Iterator[tuple[Server, Nginx]]:
    """gunicorn with the test settings, and README's nginx in front of it."""
    server = gunicorn_factory(base_env(postgres))
    nginx = start_nginx(tmp_path / "nginx", server.port)
    try:
        yield server, nginx
    finally:
        nginx.stop()


@pytest.fixture
def tokens(postgres: ThrowawayPostgres) -> Iterator[dict[str, str]]:
    """Tokens of alice (org-a) unique to this test: valid ones, and one expired."""
    # At most 40 characters (oauth_access_tokens.access_token).
    found = {kind: f"tok-nginx-{uuid.uuid4().hex[:30]}"
             for kind in ("ws-query", "poll-query", "ws-auth", "poll-auth", "expired-query")}
    rows = ", ".join(
        f"('{value}', 'web', 'alice', LOCALTIMESTAMP "
        f"{'-' if kind.startswith('expired') else '+'} INTERVAL '1 day')"
        for kind, value in found.items())
    postgres.psql("INSERT INTO oauth_access_tokens (access_token, client_id, user_id, expires) "
                  f"VALUES {rows}")
    try:
        yield found
    finally:
        listed = ", ".join(f"'{value}'" for value in found.values())
        postgres.psql(f"DELETE FROM oauth_access_tokens WHERE access_token IN ({listed})")


def publish_via(url: str, org: str, data: Any) -> requests.Response:
    """POST an event to an organization through ``url`` (nginx)."""
    with requests.post(f"{url}/api/v1/organizations/{org}/events",
                       json={"event": "news", "data": data},
                       headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10) as reply:
        return reply


def test_readme_block_keeps_idle_websockets_longer_than_a_ping_cycle() -> None:
    # Engine.IO pings every 25 s and waits 20 s: a shorter read timeout cuts
    # idle sockets. Too slow to wait for here, so read it from the block.
    found = re.search(r"location /socket\.io/ \{[^}]*proxy_read_timeout\s+(\d+)s;",
                      readme_nginx_block())
    assert found, "README's /socket.io/ location sets no proxy_read_timeout"
    assert int(found.group(1)) > 25 + 20


def test_operator_routes_and_publish_through_nginx(behind_nginx: tuple[Server, Nginx]) -> None:
    _, nginx = behind_nginx
    for route in ("/healthz", "/readyz", "/config"):
        with requests.get(nginx.url + route, timeout=5) as reply:
            assert reply.status_code == 200, (route, reply.text)
            assert reply.json()
    reply = publish_via(nginx.url, "org-a", {"to": "nobody"})
    assert reply.status_code == 202 and reply.json()["room"] == "organization.org-a"


def test_clients_through_nginx_and_no_token_in_any_log(behind_nginx: tuple[Server, Nginx],
                                                       listen: Any,
                                                       tokens: dict[str, str]) -> None:
    server, nginx = behind_nginx
    org_a = {"organizationId": "org-a"}
    accepted = {
        "ws-auth": listen(nginx.url, auth={"token": tokens["ws-auth"], **org_a},
                          transports=["websocket"]),
        "poll-auth": listen(nginx.url, auth={"token": tokens["poll-auth"], **org_a},
                            transports=["polling"]),
        "ws-query": listen(f"{nginx.url}?token={tokens['ws-query']}&organizationId=org-a",
                           transports=["websocket"]),
        "poll-query": listen(f"{nginx.url}?token={tokens['poll-query']}&organizationId=org-a",
                             transports=["polling"]),
    }
    for kind, listener in accepted.items():
        assert listener.connect_error is None, (kind, listener.connect_error)
    assert accepted["ws-auth"].client.transport() == "websocket"
    assert accepted["poll-auth"].client.transport() == "polling"

    # Refusals keep their code through nginx, whatever the transport.
    for transports in (["websocket"], ["polling"]):
        refused = listen(nginx.url, auth={"token": "tok-expired", **org_a}, transports=transports)
        assert refused.refusal_code == "token_expired", (transports, refused.connect_error)
        refused.close()
    refused = listen(f"{nginx.url}?token={tokens['expired-query']}&organizationId=org-a",
                     transports=["websocket"])
    assert refused.refusal_code == "token_expired", refused.connect_error
    refused.close()

    # Events published through nginx reach every socket, more than once:
    # nginx does not close a websocket (or a long-poll) after the first one.
    for round_ in range(3):
        value = unique(f"nginx-{round_}")
        assert publish_via(nginx.url, "org-a", {"id": value}).status_code == 202
        for kind, listener in accepted.items():
            got = listener.events_before("news", {"id": value})
            assert got == [], (kind, got)
            assert listener.client.connected, kind
    for listener in accepted.values():
        listener.close()

    # Stopped, both have written every line (nginx logs a websocket when it ends).
    nginx.stop()
    server.stop()
    access_log = nginx.access_log()
    output = server.output()
    assert "GET /socket.io/ HTTP/1.1\" 101 " in access_log, access_log
    assert "POST /socket.io/ HTTP/1.1\" 200 " in access_log, access_log
    assert "POST /api/v1/organizations/org-a/events HTTP/1.1\" 202 " in access_log, access_log
    secrets = {**tokens, "expired": "tok-expired", "api-key": API_KEY}
    for name, text in (("nginx access log", access_log), ("gunicorn output", output)):
        leaked = sorted(kind for kind, value in secrets.items() if value in text)
        assert not leaked, f"tokens in the {name}: {leaked}\n{text[-3000:]}"
    # gunicorn logs query strings, redacted; nginx's format leaves them out.
    assert "GET /socket.io/?" in output, output[-3000:]
    assert "EIO=" not in access_log and "token" not in access_log, access_log
    # Nothing went wrong on nginx's side (no upstream reset, no premature close).
    # A client that hangs up on its WebSocket while a frame is on its way
    # (python-socketio aborts the transport after a refusal) makes nginx log
    # a failed send() on that connection: the test's client, not the server.
    hung_up = r"send\(\) failed \((32: Broken pipe|104: Connection reset by peer)\) while proxying upgraded"
    errors = [line for line in nginx.error_log().splitlines()
              if re.search(r"\[(error|crit|alert|emerg)\]", line) and not re.search(hung_up, line)]
    assert not errors, errors


def test_page_origin_is_accepted_through_nginx(behind_nginx: tuple[Server, Nginx],
                                               listen: Any) -> None:
    # A browser page served by the same host:port: README's Host $http_host
    # keeps the port, so Socket.IO's same-origin check passes without
    # ORGCAST_CORS_ORIGINS. websocket-client sends that Origin by itself
    # (a second Origin header would make two); requests sends none.
    _, nginx = behind_nginx
    auth = {"token": "tok-bob", "organizationId": "org-a"}
    for transports, headers in ((["websocket"], {}), (["polling"], {"Origin": nginx.url})):
        listener = listen(nginx.url, auth=auth, transports=transports, headers=headers)
        assert listener.connect_error is None, (transports, listener.connect_error)
        value = unique("origin")
        assert publish_via(nginx.url, "org-a", value).status_code == 202
        assert listener.wait_for("news") == value
        listener.close()
    # A page elsewhere is refused at the handshake.
    with requests.get(f"{nginx.url}/socket.io/?EIO=4&transport=polling", timeout=5,
                      headers={"Origin": "http://elsewhere.example"}) as reply:
        assert reply.status_code == 403, reply.text
    with requests.get(f"{nginx.url}/socket.io/?EIO=4&transport=polling", timeout=5,
                      headers={"Origin": nginx.url}) as reply:
        assert reply.status_code == 200 and reply.text.startswith("0{"), reply.text


def test_large_event_through_nginx(behind_nginx: tuple[Server, Nginx], listen: Any) -> None:
    # A body past nginx's memory buffer goes through its client_body temp
    # file; the event reaches both transports whole (proxy_buffering off).
    _, nginx = behind_nginx
    auth = {"token": "tok-alice", "organizationId": "org-a"}
    listeners = [listen(nginx.url, auth=auth, transports=transports)
                 for transports in (["websocket"], ["polling"])]
    for listener in listeners:
        assert listener.connect_error is None, listener.connect_error
    value = unique("large") + "x" * 256 * 1024
    reply = publish_via(nginx.url, "org-a", value)
    assert reply.status_code == 202, (reply.status_code, reply.text[:500], nginx.error_log())
    for listener in listeners:
        assert listener.wait_for("news") == value


def test_two_instances_of_two_workers_behind_nginx_deliver_exactly_once(
        postgres: ThrowawayPostgres, tmp_path: Path, listen: Any) -> None:
    """The README's deployment for websocket clients: several instances, no
    affinity, the Postgres bus between them; events published to either."""
    from cluster import Cluster
    from conftest import start_gunicorn

    env = {**base_env(postgres), "WEB_CONCURRENCY": "2", "ORGCAST_LOG_LEVEL": "debug"}
    servers = [start_gunicorn(env, tmp_path) for _ in range(2)]
    nginx = start_nginx(tmp_path / "nginx", [s.port for s in servers])
    try:
        cluster = Cluster(servers, [2, 2])
        cluster.wait_listening()
        # Clients connect through nginx (round robin): keep connecting until
        # each of the four workers holds one of them.
        sockets = [listener for listener, _, _ in cluster.spread(
            listen, {"token": "tok-bob", "organizationId": "org-a"}, via=nginx.url)]
        values = [unique("behind-nginx") for _ in range(4)]
        for value, server in zip(values, servers * 2, strict=True):
            assert publish_via(server.url, "org-a", value).status_code == 202
        marker = unique("marker")
        assert requests.post(f"{nginx.url}/api/v1/organizations/org-a/events", json={"event": "marker", "data": marker},
                             headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5).status_code == 202
        for listener in sockets:
            assert listener.events_before("marker", marker, timeout=10) == [("news", v) for v in values]
    finally:
        nginx.stop()
        for server in servers:
            server.stop()


def test_rate_limiting_counts_each_client_behind_nginx_apart(postgres: ThrowawayPostgres,
                                                              gunicorn_factory: Any, tmp_path: Path) -> None:
    """README's nginx sends X-Forwarded-For; with ORGCAST_TRUSTED_PROXIES naming
    it as the README says, failures count per client, not per proxy."""
    import json as jsonlib

    from protocol import RawSession

    server = gunicorn_factory(base_env(postgres, ORGCAST_AUTH_FAILURES="3", ORGCAST_TRUSTED_PROXIES="127.0.0.1"))
    nginx = start_nginx(tmp_path / "nginx", server.port)

    def attempt(token: str, source: str) -> str:
        raw = RawSession.connect(nginx.port, source=source)
        try:
            answer = raw.connect_socketio({"token": token, "organizationId": "org-a"})
        finally:
            raw.close()
        return "ok" if answer.startswith("40{") else str(jsonlib.loads(answer[2:])["data"]["code"])

    try:
        for i in range(3):
            assert attempt(f"guess-{i}", "127.0.0.2") == "token_invalid"
        assert attempt("tok-alice", "127.0.0.2") == "rate_limited"
        assert attempt("tok-alice", "127.0.0.3") == "ok"
    finally:
        nginx.stop()
