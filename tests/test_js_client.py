"""The official socket.io-client 4.x (Node.js), against the real gunicorn.

The client comes from the npm registry through the Makefile (the same copy
the demo page serves); these tests fail, not skip, when it is missing.
"""

from __future__ import annotations

import json
import queue
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, publish

NODE_MODULES = ROOT / ".cache" / "npm" / "node_modules"
CLIENT = Path(__file__).resolve().parent / "js" / "client.js"


class JsClient:
    """A Node.js socket.io-client process whose JSON lines we can wait on."""

    def __init__(self, url: str, options: dict[str, Any]) -> None:
        node = shutil.which("node")
        assert node, "node is required (Debian package nodejs)"
        assert (NODE_MODULES / "socket.io-client").is_dir(), "run make to fetch socket.io-client"
        self.proc = subprocess.Popen(
            [node, str(CLIENT), url, json.dumps(options)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={"NODE_PATH": str(NODE_MODULES), "PATH": "/usr/bin:/bin"})
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.lines.put(json.loads(line))
            except ValueError:
                self.lines.put({"type": "output", "text": line})

    def next(self, *types: str, timeout: float = 10.0) -> dict[str, Any]:
        """Return the next line of one of ``types``; fail after ``timeout``."""
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no {types} from the JS client within {timeout} s") from None
            if line["type"] in types:
                return line

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write("close\n")
                self.proc.stdin.flush()
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()
        self._reader.join(5)


@pytest.fixture
def js_client() -> Iterator[Any]:
    started: list[JsClient] = []

    def start(url: str, **options: Any) -> JsClient:
        client = JsClient(url, options)
        started.append(client)
        return client

    yield start
    for client in started:
        client.close()


@pytest.mark.parametrize("transports", [["websocket"], ["polling"], ["polling", "websocket"]])
def test_official_client_connects_and_receives_news(gunicorn_server: Any, js_client: Any,
                                                    transports: list[str]) -> None:
    client = js_client(gunicorn_server.url, auth={"token": "tok-alice", "organizationId": "org-a"},
                       transports=transports)
    client.next("connect")
    assert publish(gunicorn_server, "org-a", data={"hello": transports}).status_code == 202
    event = client.next("event")
    assert event["name"] == "news" and event["args"] == [{"hello": transports}]


@pytest.mark.parametrize(
    ("auth", "code"),
    [
        ({"organizationId": "org-a"}, "token_missing"),
        ({"token": "tok-alice"}, "organization_missing"),
        ({"token": "tok-alice", "organizationId": "bad id"}, "organization_invalid"),
        ({"token": "no-such-token", "organizationId": "org-a"}, "token_invalid"),
        ({"token": "tok-expired", "organizationId": "org-a"}, "token_expired"),
        ({"token": "tok-carol", "organizationId": "org-a"}, "forbidden"),
    ],
)
def test_official_client_sees_the_refusal_code(gunicorn_server: Any, js_client: Any,
                                               auth: dict[str, str], code: str) -> None:
    client = js_client(gunicorn_server.url, auth=auth, transports=["websocket"])
    error = client.next("connect_error", "connect")
    assert error["type"] == "connect_error"
    assert error["data"] == {"code": code}
    assert error["message"] and error["message"] != code


def test_official_client_with_query_string(gunicorn_server: Any, js_client: Any) -> None:
    # Older frontends send credentials in the query string.
    client = js_client(gunicorn_server.url, query={"token": "tok-bob", "organizationId": "org-a"},
                       transports=["websocket"])
    client.next("connect")
    publish(gunicorn_server, "org-a", data="q")
    assert client.next("event")["args"] == ["q"]


def test_official_client_with_bearer_header(gunicorn_server: Any, js_client: Any) -> None:
    client = js_client(gunicorn_server.url, auth={"organizationId": "org-b"},
                       extraHeaders={"Authorization": "Bearer tok-carol"}, transports=["websocket"])
    client.next("connect")
    publish(gunicorn_server, "org-b", data="h")
    assert client.next("event")["args"] == ["h"]
