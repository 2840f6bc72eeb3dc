"""The /demo page in a real browser: headless Debian Chromium, driven over the
Chrome DevTools Protocol, running the official socket.io client from npm
against a real gunicorn.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import websocket
from conftest import ROOT, ThrowawayPostgres, base_env, publish
from throwaway import terminate

CHROMIUM = Path("/usr/bin/chromium")
CLIENT_JS = ROOT / ".cache/npm/node_modules/socket.io-client/dist/socket.io.min.js"
# The flags this machine needs (no sandbox as root, no network but loopback).
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


class Page:
    """One browser tab, spoken to over its DevTools WebSocket."""

    def __init__(self, ws_url: str) -> None:
        self.ws = websocket.create_connection(ws_url, timeout=10, suppress_origin=True)
        self._ids = itertools.count(1)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one DevTools command and return its result (events are skipped)."""
        msg_id = next(self._ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise AssertionError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply["result"]
                return result

    def evaluate(self, expression: str) -> Any:
        """Return the value of a JavaScript expression in the page."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_until(self, expression: str, timeout: float = 10.0) -> Any:
        """Return the expression's value once it is truthy; fail after ``timeout``.

        An exception (the page still loading) counts as not yet.
        """
        deadline = time.monotonic() + timeout
        guarded = f"(() => {{ try {{ return ({expression}); }} catch (e) {{ return null; }} }})()"
        while True:
            value = self.evaluate(guarded)
            if value:
                return value
            if time.monotonic() > deadline:
                status = self.evaluate("document.getElementById('status')?.textContent")
                raise AssertionError(f"{expression} still falsy after {timeout} s; "
                                     f"status: {status!r}")
            time.sleep(0.05)

    def close(self) -> None:
        self.ws.close()


class Browser:
    """A headless Chromium with remote debugging on a port it picks itself."""

    def __init__(self) -> None:
        self.profile = Path(tempfile.mkdtemp(prefix="orgcast-chromium-"))
        self.log = open(self.profile.parent / (self.profile.name + ".log"), "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}",
             "--remote-debugging-port=0", "about:blank"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.pages: list[Page] = []
        # Chromium writes the port it chose into DevToolsActivePort.
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 15
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail("chromium did not start:\n" + self.output())
            time.sleep(0.05)
        self.endpoint = f"http://127.0.0.1:{port_file.read_text().split()[0]}"

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-4000:]

    def open(self, url: str) -> Page:
        """Open ``url`` in a new tab and return it."""
        target = requests.put(f"{self.endpoint}/json/new?about:blank", timeout=10).json()
        page = Page(target["webSocketDebuggerUrl"])
        self.pages.append(page)
        # Navigated over the protocol: a URL in /json/new would lose its #fragment.
        page.call("Page.navigate", url=url)
        page.wait_until(f"location.href === {json.dumps(url)} && document.readyState === 'complete'")
        return page

    def stop(self) -> None:
        for page in self.pages:
            page.close()
        terminate(self.proc)
        # Its helper processes (renderer, GPU, network) may outlive the
        # browser for a moment and write into the profile: end the group.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture
def demo_server(postgres: ThrowawayPostgres, gunicorn_factory: Any) -> Any:
    if not CLIENT_JS.is_file():
        target = CLIENT_JS.relative_to(ROOT)
        pytest.fail(f"{target} is missing: run `make {target}` (it fetches it with npm)")
    return gunicorn_factory(base_env(postgres, ORGCAST_DEMO_DIR=str(CLIENT_JS.parent)))


@pytest.fixture
def browser(demo_server: Any) -> Iterator[Browser]:
    # Depends on demo_server so that it closes first: gunicorn's graceful
    # stop would otherwise wait for the page's socket to go away.
    if not CHROMIUM.exists():
        pytest.fail("Debian's chromium is not installed: run `make system-deps` (as root)")
    b = Browser()
    yield b
    b.stop()


STATUS = "document.getElementById('status')"
EVENTS = "document.getElementById('events')"


def test_demo_page_shows_events_as_they_arrive(browser: Browser, demo_server: Any) -> None:
    page = browser.open(f"{demo_server.url}/demo#token=tok-alice&organizationId=org-a")
    page.wait_until(f"{STATUS}.className === 'ok'")
    assert page.evaluate(f"{STATUS}.textContent").startswith("Connected as socket ")
    assert page.evaluate("typeof io") == "function"  # the real client, served by /demo

    for n in (1, 2):
        response = publish(demo_server, "org-a", "news", {"headline": f"browser check {n}"})
        assert response.status_code == 202
        page.wait_until(f"{EVENTS}.textContent.includes('browser check {n}')")
    items = page.evaluate(f"[...{EVENTS}.querySelectorAll('li pre')].map(e => e.textContent)")
    # Newest first; each event's data as pretty JSON.
    assert [json.loads(text) for text in items] == [{"headline": "browser check 2"},
                                                    {"headline": "browser check 1"}]

    # An event for another organization never shows.
    assert publish(demo_server, "org-b", "news", {"headline": "not for org-a"}).status_code == 202
    publish(demo_server, "org-a", "news", {"headline": "after org-b"})
    page.wait_until(f"{EVENTS}.textContent.includes('after org-b')")
    assert "not for org-a" not in page.evaluate(f"{EVENTS}.textContent")


@pytest.mark.parametrize(("token", "code", "relogin"), [
    ("no-such-token", "token_invalid", True),
    ("tok-expired", "token_expired", True),
    ("tok-carol", "forbidden", False),
])
def test_demo_page_shows_the_refusal_code(browser: Browser, demo_server: Any, token: str,
                                          code: str, relogin: bool) -> None:
    page = browser.open(f"{demo_server.url}/demo#token={token}&organizationId=org-a")
    status = page.wait_until(f"{STATUS}.className === 'err' && {STATUS}.textContent")
    assert f"({code})" in status
    assert ("Please log in again." in status) == relogin
    assert "Retrying" not in status  # only unavailable / rate_limited are retried
