"""The Engine.IO 4 / Socket.IO 5 protocol's MUSTs, checked with raw frames against
the real gunicorn (the official client hides most of these), with the timings
of the official protocol test suites (README, "Running the official protocol
test suites")."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import websocket
from conftest import API_KEY, Server, base_env, start_gunicorn
from protocol import SUITE_ENV, RawSession, raw_http, read_response, upgrade_request, wait_until_read_by_server

ALICE = {"token": "tok-alice", "organizationId": "org-a"}


@pytest.fixture(scope="module")
def suite_server(postgres: Any, tmp_path_factory: Any) -> Iterator[Server]:
    server = start_gunicorn(base_env(postgres, **SUITE_ENV), tmp_path_factory.mktemp("suite"))
    yield server
    server.stop()


@pytest.fixture
def session(suite_server: Server) -> Iterator[RawSession]:
    raw = RawSession.connect(suite_server.port)
    yield raw
    raw.close()


def polling_open(server: Server, query: str = "EIO=4&transport=polling") -> str:
    reply = requests.get(f"{server.url}/socket.io/?{query}", timeout=5)
    assert reply.status_code == 200, reply.text
    assert reply.text.startswith("0")
    sid: str = json.loads(reply.text[1:])["sid"]
    return sid


def poll_url(server: Server, sid: str) -> str:
    return f"{server.url}/socket.io/?EIO=4&transport=polling&sid={sid}"


def no_tracebacks(server: Server) -> None:
    assert "Traceback" not in server.output(), server.output()[-3000:]


# --- settings: the timings are what the OPEN packet says ------------------------------


def test_open_packet_announces_the_configured_timings(session: RawSession) -> None:
    assert session.open["pingInterval"] == 300
    assert session.open["pingTimeout"] == 200
    assert session.open["maxPayload"] == 1000000
    assert session.open["upgrades"] == []
    # and the server pings on that schedule: three pings in about a second
    session.connect_socketio(ALICE)
    deadline = time.monotonic() + 3
    while session.pings < 3:
        assert time.monotonic() < deadline, "fewer than 3 pings in 3 s at a 0.3 s interval"
        with pytest.raises(AssertionError):
            session.recv(timeout=0.5)


def test_polling_open_packet_offers_the_upgrade(suite_server: Server) -> None:
    reply = requests.get(f"{suite_server.url}/socket.io/?EIO=4&transport=polling", timeout=5)
    opened = json.loads(reply.text[1:])
    assert opened["upgrades"] == ["websocket"] and opened["pingInterval"] == 300


# --- sessions that never authorize are closed ------------------------------------------


def test_a_session_that_sends_no_connect_is_closed_after_the_connect_timeout(
        session: RawSession) -> None:
    # It answers every ping: only the admission deadline (1 s here) can end it.
    waited = session.wait_closed(timeout=4)
    assert 0.5 < waited < 3


def test_a_refused_session_is_closed_after_the_connect_timeout(session: RawSession) -> None:
    answer = session.connect_socketio({"token": "no-such-token", "organizationId": "org-a"})
    assert answer.startswith("44") and json.loads(answer[2:])["data"] == {"code": "token_invalid"}
    assert session.wait_closed(timeout=4) < 3


def test_an_admitted_session_is_not_closed_by_the_connect_timeout(session: RawSession) -> None:
    assert session.connect_socketio(ALICE).startswith("40{")
    with pytest.raises(AssertionError, match="nothing but pings"):
        session.recv(timeout=2)  # two connect timeouts: still open, still pinged
    assert session.pings >= 3


def test_a_session_that_leaves_the_namespace_is_closed_after_the_connect_timeout(
        session: RawSession) -> None:
    assert session.connect_socketio(ALICE).startswith("40{")
    session.send("41")
    assert session.wait_closed(timeout=4) < 3


def test_a_polling_session_without_connect_ends_after_the_connect_timeout(
        suite_server: Server) -> None:
    sid = polling_open(suite_server)
    deadline = time.monotonic() + 4
    while True:  # answer pings as a client would
        reply = requests.get(poll_url(suite_server, sid), timeout=5)
        if reply.status_code == 400 or reply.text == "1":
            break
        assert reply.text == "2", reply.text
        assert requests.post(poll_url(suite_server, sid), data="3", timeout=5).text == "ok"
        assert time.monotonic() < deadline, "polling session still open after 4 s"


# --- Socket.IO: namespaces and malformed packets ----------------------------------------


def test_connect_to_another_namespace_is_an_object_with_a_code(session: RawSession) -> None:
    answer = session.connect_socketio(namespace="/admin")
    assert answer.startswith("44/admin,")
    assert json.loads(answer[len("44/admin,"):]) == {
        "message": "Invalid namespace: orgcast serves the namespace \"/\" only.",
        "data": {"code": "namespace_invalid"}}


def test_a_second_connect_to_the_main_namespace_is_refused_and_the_first_kept(
        suite_server: Server, session: RawSession) -> None:
    assert session.connect_socketio(ALICE).startswith("40{")
    answer = session.connect_socketio(ALICE)
    assert answer.startswith("44{") and json.loads(answer[2:])["data"] == {"code": "namespace_invalid"}
    marker = f"still-{time.monotonic()}"
    assert requests.post(f"{suite_server.url}/api/v1/organizations/org-a/events",
                         json={"event": "news", "data": marker},
                         headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5).status_code == 202
    assert re.fullmatch(rf'42\["news","{re.escape(marker)}","[0-9]+"\]', session.recv())  # its offset last


@pytest.mark.parametrize("frame", [
    "4abc",                          # unknown Socket.IO packet type ("a")
    "9",                             # unknown packet type
    '40"just a string"',             # CONNECT payload that is not an object
    "40[1,2]",                       # ... nor an array
    "40{bad json",                   # ... nor JSON
    "41",                            # DISCONNECT before CONNECT
    '42["news","x"]',                # EVENT before CONNECT
    '44{"message":"forged"}',        # a client never sends CONNECT_ERROR
])
def test_malformed_packets_before_connect_close_the_session(suite_server: Server,
                                                            session: RawSession, frame: str) -> None:
    session.send(frame)
    assert session.wait_closed(timeout=0.9) < 0.9  # well before the 1 s connect timeout
    no_tracebacks(suite_server)


@pytest.mark.parametrize("frame", [
    "4abc",
    "42{}",                                            # EVENT payload not an array
    "42[]",                                            # ... empty
    "42[1.5]",                                         # ... name not a string
    '42abc["message-with-ack",1]',                     # ack id not a number
    '42["connect",{"token":"tok-carol"}]',             # reserved event names
    '42["disconnect"]',
    '42["connect_error",{"message":"forged"}]',
    '44{"message":"forged"}',
    "42" + "[" * 100_000,                              # nested beyond any parser
    "4" + "[" * 5000,
    '451-["news",{"_placeholder":true,"num":0}]',      # binary event, then text instead of it
    '42/admin,["news"]',                               # EVENT for a namespace it is not in
])
def test_malformed_packets_after_connect_close_the_session(suite_server: Server,
                                                           session: RawSession, frame: str) -> None:
    assert session.connect_socketio(ALICE).startswith("40{")
    session.send(frame)
    if frame.startswith("451-"):
        session.send('42["news"]')
    assert session.wait_closed(timeout=2) < 2
    no_tracebacks(suite_server)


def test_a_protocol_error_logs_one_line_and_a_flood_is_capped(postgres: Any, gunicorn_factory: Any) -> None:
    server = gunicorn_factory(base_env(postgres, **SUITE_ENV))
    for _ in range(40):
        raw = RawSession.connect(server.port)
        raw.send("42{}")
        raw.wait_closed(timeout=2)
        raw.close()
    lines = [line for line in server.output().splitlines() if "protocol error" in line]
    assert 1 <= len(lines) <= 21, lines  # one each, then the 20-a-minute cap
    assert "packet type 2" in lines[0] or "invalid payload" in lines[0]
    no_tracebacks(server)


def test_binary_data_nobody_announced_closes_the_session(session: RawSession) -> None:
    assert session.connect_socketio(ALICE).startswith("40{")
    session.send(b"\x01\x02\x03")
    assert session.wait_closed(timeout=2) < 2


def test_announced_binary_attachments_are_swallowed(suite_server: Server,
                                                    session: RawSession) -> None:
    assert session.connect_socketio(ALICE).startswith("40{")
    session.send('452-["news",{"_placeholder":true,"num":0},{"_placeholder":true,"num":1}]')
    session.send(b"\x01\x02\x03")
    session.send(b"\x04\x05\x06")
    marker = f"after-binary-{time.monotonic()}"
    requests.post(f"{suite_server.url}/api/v1/organizations/org-a/events",
                  json={"event": "news", "data": marker},
                  headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5)
    assert re.fullmatch(rf'42\["news","{re.escape(marker)}","[0-9]+"\]', session.recv())  # its offset last


@pytest.mark.parametrize("frame", ["abc", "", "7", "0", "6", "2", "5"])
def test_malformed_engineio_packets_close_the_session(suite_server: Server, session: RawSession,
                                                      frame: str) -> None:
    session.send(frame)
    assert session.wait_closed(timeout=0.9) < 0.9
    no_tracebacks(suite_server)


def test_client_close_packet_closes_the_websocket(session: RawSession) -> None:
    session.send("1")
    assert session.wait_closed(timeout=0.9) < 0.9


def test_the_peer_s_own_close_after_the_server_s_meets_no_reset(suite_server: Server) -> None:
    """After its close frame the server reads (and drops) until the peer closes: a client's
    close frame sent just then must not meet a closed socket, which answers with a reset
    (nginx in front logs "send() failed (32: Broken pipe)" at error level)."""
    session = RawSession.connect(suite_server.port)
    sock = session.ws.sock
    session.send("1")  # the Engine.IO close: the server closes the websocket
    sock.settimeout(5)
    received = b""
    while not received.endswith(b"\x88\x02\x03\xe8"):  # its close frame, 1000
        chunk = sock.recv(64)
        assert chunk, received
        received += chunk
    assert sock.recv(1) == b""  # then its FIN
    mask = b"\x01\x02\x03\x04"
    sock.sendall(b"\x88\x82" + mask + bytes(a ^ b for a, b in zip(b"\x03\xe8", mask[:2], strict=True)))
    sock.sendall(b"\x81\x81" + mask + bytes([ord("x") ^ 1]))  # and something late
    try:
        assert sock.recv(1) == b""
    except ConnectionResetError:
        pytest.fail("the server reset the connection under the client's close")
    finally:
        sock.close()


# --- WebSocket requests Engine.IO refuses get the HTTP error, not a 101 -----------------


@pytest.mark.parametrize(("query", "headers", "status", "code"), [
    ("transport=websocket", {}, 400, "bad_request"),                   # no EIO
    ("EIO=abc&transport=websocket", {}, 400, "bad_request"),
    ("EIO=3&transport=websocket", {}, 400, "bad_request"),
    ("EIO=4", {}, 400, "bad_request"),                                 # no transport
    ("EIO=4&transport=abc", {}, 400, "bad_request"),
    ("EIO=4&transport=websocket&sid=no-such-session", {}, 400, "bad_request"),
    ("EIO=4&transport=websocket", {"Origin": "https://evil.example"}, 403, "origin_not_allowed"),
])
def test_refused_websocket_requests_get_the_http_error_before_any_upgrade(
        suite_server: Server, query: str, headers: dict[str, str], status: int, code: str) -> None:
    reply = raw_http(suite_server.port, upgrade_request(f"/socket.io/?{query}", headers))
    assert reply.status == status, reply
    assert reply.headers["content-type"] == "application/json"
    assert reply.json()["error"]["code"] == code
    assert reply.json()["error"]["message"] != "Bad request."


@pytest.mark.parametrize(("drop", "replace"), [
    ("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", ""),
    ("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Key: c2hvcnQ="),
    ("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 99"),
])
def test_bad_websocket_handshakes_are_400_json(suite_server: Server, drop: str, replace: str) -> None:
    request = upgrade_request("/socket.io/?EIO=4&transport=websocket").replace(
        drop.encode(), replace.encode())
    reply = raw_http(suite_server.port, request)
    assert reply.status == 400 and reply.json()["error"]["code"] == "bad_request"
    assert reply.closed
    no_tracebacks(suite_server)


def test_a_second_websocket_for_an_upgraded_session_is_closed_and_the_first_kept(suite_server: Server) -> None:
    sid = polling_open(suite_server)
    ws = websocket.create_connection(
        f"ws://127.0.0.1:{suite_server.port}/socket.io/?EIO=4&transport=websocket&sid={sid}", timeout=5)
    try:
        ws.send("2probe")
        assert ws.recv() == "3probe"
        ws.send("5")
        # As Node does: the second WebSocket is accepted and closed at once ...
        second = websocket.create_connection(
            f"ws://127.0.0.1:{suite_server.port}/socket.io/?EIO=4&transport=websocket&sid={sid}", timeout=5)
        try:
            assert RawSession(second, {}).wait_closed(timeout=1) < 1
        finally:
            second.shutdown()
        assert requests.get(poll_url(suite_server, sid), timeout=5).status_code == 400
        # ... and the first one carries on.
        ws.send('40{"token":"tok-alice","organizationId":"org-a"}')
        assert ws.recv().startswith("40{")
    finally:
        ws.shutdown()


# --- polling -----------------------------------------------------------------------------


def test_polling_without_transport_is_400(suite_server: Server) -> None:
    reply = requests.get(f"{suite_server.url}/socket.io/?EIO=4", timeout=5)
    assert reply.status_code == 400
    assert "transport" in reply.json()["error"]["message"]


def test_polling_post_answers_ok_and_delivers(suite_server: Server) -> None:
    sid = polling_open(suite_server)
    post = requests.post(poll_url(suite_server, sid), data='40{"token":"tok-alice","organizationId":"org-a"}',
                         timeout=5)
    assert post.status_code == 200 and post.text == "ok"
    assert requests.get(poll_url(suite_server, sid), timeout=5).text.startswith("40{")


@pytest.mark.parametrize("body", ["abc", "", "4hello\x1e", "bnot*base64", "\x1e".join(["3"] * 17)])
def test_an_undecodable_polling_post_is_400_and_ends_the_session(suite_server: Server,
                                                                 body: str) -> None:
    sid = polling_open(suite_server)
    reply = requests.post(poll_url(suite_server, sid), data=body.encode(), timeout=5)
    assert reply.status_code == 400
    message = reply.json()["error"]["message"]
    assert "protocol error" in message and "\"event\"" not in message
    assert requests.get(poll_url(suite_server, sid), timeout=5).status_code == 400
    no_tracebacks(suite_server)


def test_an_oversized_polling_post_says_so(suite_server: Server) -> None:
    sid = polling_open(suite_server)
    reply = requests.post(poll_url(suite_server, sid), data=b"4" + b"x" * 1_000_001, timeout=10)
    assert reply.status_code == 400
    assert "ORGCAST_MAX_PAYLOAD" in reply.json()["error"]["message"]
    assert requests.get(poll_url(suite_server, sid), timeout=5).status_code == 400


def _pending_get(server: Server, sid: str) -> socket.socket:
    """A GET of the session, sent raw and read by the server: it is waiting there now."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.sendall(f"GET /socket.io/?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\n"
                 f"Host: 127.0.0.1\r\n\r\n".encode())
    wait_until_read_by_server(sock)
    return sock


def test_a_duplicate_get_is_400_at_once_and_the_pending_one_gets_close(suite_server: Server) -> None:
    sid = polling_open(suite_server)
    with _pending_get(suite_server, sid) as pending:
        started = time.monotonic()
        second = requests.get(poll_url(suite_server, sid) + "&t=burst", timeout=5)
        assert time.monotonic() - started < 0.25
        assert second.status_code == 400
        assert "duplicate GET" in second.json()["error"]["message"]
        first = read_response(pending)
    assert first.status == 200 and first.body == b"1"
    assert requests.get(poll_url(suite_server, sid), timeout=5).status_code == 400


def test_a_pending_get_of_a_session_the_client_closes_gets_noop(suite_server: Server) -> None:
    sid = polling_open(suite_server)
    with _pending_get(suite_server, sid) as pending:
        assert requests.post(poll_url(suite_server, sid), data="1", timeout=5).status_code == 200
        reply = read_response(pending)
    assert reply.status == 200 and reply.body == b"6"
    assert requests.get(poll_url(suite_server, sid), timeout=5).status_code == 400


def test_polling_session_closes_upon_ping_timeout(suite_server: Server) -> None:
    sid = polling_open(suite_server)
    opened = time.monotonic()
    # A GET returns the ping (after 0.3 s), or nothing once the session ends: no ping is
    # answered, so it ends 0.2 s after the first, and the next GET is refused.
    while (reply := requests.get(poll_url(suite_server, sid), timeout=5)).status_code == 200:
        assert time.monotonic() - opened < 5, "the session outlived its unanswered pings"
    assert reply.status_code == 400
    assert time.monotonic() - opened >= 0.3 + 0.2 - 0.05, "closed before its ping timed out"


def test_the_first_post_to_an_expired_polling_session_is_400_without_traceback(
        suite_server: Server) -> None:
    sid = polling_open(suite_server)
    time.sleep(0.3 + 0.2 + 0.3)  # its ping was never answered
    for _ in range(3):
        reply = requests.post(poll_url(suite_server, sid), data="3", timeout=5)
        assert reply.status_code == 400 and reply.json()["error"]["code"] == "bad_request"
    no_tracebacks(suite_server)


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH"])
def test_other_methods_are_400(suite_server: Server, method: str) -> None:
    reply = requests.request(method, f"{suite_server.url}/socket.io/?EIO=4&transport=polling", timeout=5)
    assert reply.status_code == 400 and method in reply.json()["error"]["message"]


def test_a_post_that_opens_a_session_is_400(suite_server: Server) -> None:
    reply = requests.post(f"{suite_server.url}/socket.io/?EIO=4&transport=polling", timeout=5)
    assert reply.status_code == 400


def test_each_engineio_refusal_has_its_own_message(suite_server: Server) -> None:
    urls = ["EIO=4", "EIO=3&transport=polling", "EIO=4&transport=abc",
            "EIO=4&transport=polling&sid=nope", "EIO=4&transport=polling&j=1"]
    messages = {requests.get(f"{suite_server.url}/socket.io/?{q}", timeout=5).json()["error"]["message"]
                for q in urls}
    assert len(messages) == len(urls)
    assert not any(re.search(r"\"event\"", m) for m in messages)
