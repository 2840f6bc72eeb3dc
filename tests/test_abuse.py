"""One client cannot hurt the others, round two (issue 17): each probe as an attacker holding one
valid token (or none) would make it, with raw sockets where the official client would hide it."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import API_KEY, Server, base_env, publish, start_gunicorn

BOB = {"token": "tok-bob", "organizationId": "org-a"}


@pytest.fixture(scope="module")
def server(postgres: Any, tmp_path_factory: Any) -> Iterator[Server]:
    srv = start_gunicorn(base_env(postgres, ORGCAST_HEADER_TIMEOUT="2", ORGCAST_SEND_BUFFER="200000",
                                  ORGCAST_AUTH_CACHE_TTL="10"), tmp_path_factory.mktemp("abuse"))
    yield srv
    srv.stop()


def test_headers_trickled_a_byte_at_a_time_are_cut_at_the_header_timeout(server: Server) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        started = time.monotonic()
        closed = False
        while time.monotonic() - started < 8:
            try:
                sock.sendall(b"a")
                sock.settimeout(0.5)
                if sock.recv(1024) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except OSError:
                closed = True
                break
        assert closed, "a trickle of header bytes kept the connection for 8 s (ORGCAST_HEADER_TIMEOUT=2)"
        assert time.monotonic() - started < 5


def test_a_polling_client_that_never_fetches_is_cut_off_at_the_send_buffer(server: Server) -> None:
    http = requests.Session()
    opened = http.get(f"{server.url}/socket.io/?EIO=4&transport=polling", timeout=5)
    sid = json.loads(opened.text[1:])["sid"]
    url = f"{server.url}/socket.io/?EIO=4&transport=polling&sid={sid}"
    assert http.post(url, data="40" + json.dumps(BOB), timeout=5).text == "ok"
    assert http.get(url, timeout=5).text.startswith("40{")  # admitted: from now on it never fetches
    blob = "z" * 5000
    for i in range(60):  # 300 KB for a client allowed 200 KB
        assert publish(server, "org-a", "news", {"i": i, "blob": blob}).status_code == 202
        http.post(url, data="3", timeout=5)  # it answers pings, blindly
    deadline = time.monotonic() + 5
    while "closing a polling session that does not fetch" not in server.output():
        assert time.monotonic() < deadline, "the polling client that never fetches was not cut off"
        time.sleep(0.05)
    assert http.get(url, timeout=5).status_code == 400  # the session is gone


def test_a_refresh_flood_is_refused_after_a_burst(server: Server) -> None:
    import socketio

    client = socketio.Client(reconnection=False)
    client.connect(server.url, auth=BOB, transports=["websocket"], wait_timeout=10)
    try:
        answers = [client.call("refresh", {"token": "tok-bob"}, timeout=5) for _ in range(30)]
    finally:
        client.disconnect()
    codes = [a.get("code", "ok") if not a["ok"] else "ok" for a in answers]
    assert codes[:10] == ["ok"] * 10
    assert "rate_limited" in codes[10:]


def test_a_lone_surrogate_in_published_data_arrives_as_the_same_value(server: Server, listen: Any) -> None:
    listener = listen(server.url, auth=BOB)
    body = b'{"event": "news", "data": {"text": "\\ud800 and \\udfff"}}'
    reply = requests.post(f"{server.url}/api/v1/organizations/org-a/events", data=body,
                          headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
                          timeout=5)
    assert reply.status_code == 202, reply.text
    assert listener.wait_for("news") == {"text": "\ud800 and \udfff"}
    assert "Traceback" not in server.output()


@pytest.mark.parametrize("token", ["tok\x00bob", "tok\ud800bob"], ids=["nul", "lone-surrogate"])
def test_a_token_no_database_could_hold_is_invalid_not_unavailable(server: Server, token: str) -> None:
    from protocol import RawSession

    raw = RawSession.connect(server.port)
    try:
        answer = raw.connect_socketio({"token": token, "organizationId": "org-a"})
    finally:
        raw.close()
    assert answer.startswith("44") and json.loads(answer[2:])["data"] == {"code": "token_invalid"}


def test_malformed_requests_are_logged_within_the_cap(server: Server) -> None:
    before = server.output().count("Invalid request")
    for _ in range(60):
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(b"GARBAGE NOT HTTP\x00\r\n\r\n")
            try:
                sock.recv(1024)
            except OSError:
                pass
    assert requests.get(f"{server.url}/healthz", timeout=5).status_code == 200
    assert server.output().count("Invalid request") - before <= 21


def test_metrics_are_denied_behind_the_readme_nginx(server: Server, tmp_path: Path) -> None:
    from test_nginx import start_nginx

    nginx = start_nginx(tmp_path / "nginx", server.port)
    try:
        assert requests.get(f"{nginx.url}/metrics", timeout=5).status_code == 403
        assert requests.get(f"{server.url}/metrics", timeout=5).status_code == 200
    finally:
        nginx.stop()


def test_two_subscribes_at_once_add_the_organization_once(postgres: Any, gunicorn_factory: Any) -> None:
    """A socket's events are handled one after the other (issue 18): two subscribes sent
    together cannot both add it, so a third organization still fits in the limit."""
    import socketio
    from test_lifecycle import new_user

    server = gunicorn_factory(base_env(postgres, ORGCAST_MAX_SUBSCRIPTIONS="3"))
    _, token = new_user(postgres, 3600, ("org-a", "org-b", "org-c"))
    client = socketio.Client(reconnection=False)
    client.connect(server.url, auth={"token": token, "organizationId": "org-a"}, transports=["websocket"],
                   wait_timeout=10)
    try:
        import threading

        acks: list[Any] = []
        done = threading.Event()

        def on_ack(answer: Any) -> None:
            acks.append(answer)
            if len(acks) == 2:
                done.set()

        for _ in range(2):
            client.emit("subscribe", {"organizationId": "org-b"}, callback=on_ack)
        assert done.wait(10)
        assert [a["ok"] for a in acks] == [True, True]
        assert client.call("subscribe", {"organizationId": "org-c"}, timeout=10)["ok"] is True
    finally:
        client.disconnect()


def test_an_oversized_publish_behind_nginx_gets_orgcast_s_413(postgres: Any, gunicorn_factory: Any,
                                                              tmp_path: Path) -> None:
    from test_nginx import start_nginx

    server = gunicorn_factory(base_env(postgres, ORGCAST_MAX_PAYLOAD="2000"))
    nginx = start_nginx(tmp_path / "nginx", server.port)
    try:
        for _ in range(5):
            reply = requests.post(f"{nginx.url}/api/v1/organizations/org-a/events",
                                  data=json.dumps({"event": "news", "data": "x" * 200_000}),
                                  headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)
            assert reply.status_code == 413 and reply.json()["error"]["code"] == "payload_too_large"
    finally:
        nginx.stop()
