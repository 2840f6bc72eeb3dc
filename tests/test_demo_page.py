"""The /demo and /admin pages in a real browser: headless Debian Chromium,
driven over the Chrome DevTools Protocol, against a real gunicorn (the demo
page running the official socket.io client from npm). Each test saves a
screenshot in build/screenshots/.
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
from conftest import API_KEY, ROOT, ThrowawayPostgres, base_env, publish
from throwaway import terminate

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = ROOT / "build" / "screenshots"
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

    def screenshot(self, name: str) -> Path:
        """Save what the page shows as build/screenshots/<name>.png."""
        import base64

        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        shot = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        assert path.stat().st_size > 1000
        return path

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
    # Published before the page opens: the page's rewind shows it (the latest 10 events).
    assert publish(demo_server, "org-a", "news", {"headline": "before the page"}).status_code == 202
    page = browser.open(f"{demo_server.url}/demo#token=tok-alice&organizationId=org-a")
    page.wait_until(f"{EVENTS}.textContent.includes('before the page')")
    page.wait_until(f"{STATUS}.className === 'ok'")
    assert page.evaluate(f"{STATUS}.textContent").startswith("Connected as socket ")
    assert page.evaluate("typeof io") == "function"  # the real client, served by /demo

    for n in (1, 2):
        response = publish(demo_server, "org-a", "news", {"headline": f"browser check {n}"})
        assert response.status_code == 202
        page.wait_until(f"{EVENTS}.textContent.includes('browser check {n}')")
    items = page.evaluate(f"[...{EVENTS}.querySelectorAll('li pre')].map(e => e.textContent)")
    # Newest first; each event's data as pretty JSON; below them, what the rewind showed.
    assert [json.loads(text) for text in items[:3]] == [{"headline": "browser check 2"},
                                                        {"headline": "browser check 1"},
                                                        {"headline": "before the page"}]

    # An event for another organization never shows.
    assert publish(demo_server, "org-b", "news", {"headline": "not for org-a"}).status_code == 202
    publish(demo_server, "org-a", "news", {"headline": "after org-b"})
    page.wait_until(f"{EVENTS}.textContent.includes('after org-b')")
    assert "not for org-a" not in page.evaluate(f"{EVENTS}.textContent")
    page.screenshot("demo-events")


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
    page.screenshot(f"demo-refused-{code}")


def test_status_page_shows_sockets_and_rates_live(browser: Browser, demo_server: Any, listen: Any) -> None:
    listener = listen(demo_server.url, auth={"token": "tok-alice", "organizationId": "org-a"})
    assert listener.connect_error is None
    page = browser.open(f"{demo_server.url}/admin")
    page.evaluate(f"document.getElementById('key').value = {json.dumps(API_KEY)}; "
                  "document.getElementById('form').requestSubmit()")
    page.wait_until("document.getElementById('sockets').textContent === '1'")
    # A publish rate needs publishes between two polls of the page (every 2 s).
    deadline = time.monotonic() + 15
    while not page.evaluate("parseFloat(document.getElementById('publish-rate').textContent) > 0"):
        assert time.monotonic() < deadline, page.evaluate("document.getElementById('status').textContent")
        assert publish(demo_server, "org-a", "news", {"n": 1}).status_code == 202
        time.sleep(0.2)
    assert page.evaluate("parseFloat(document.getElementById('delivery-rate').textContent)") > 0
    page.wait_until("document.querySelector('#chart polyline') !== null")
    attempts = page.evaluate("[...document.querySelectorAll('#attempts tr')].map(r => r.textContent)")
    assert any(row.startswith("ok") for row in attempts)
    assert "org-a" in page.evaluate("document.getElementById('organizations').textContent")
    # The key is in the page's memory only: not in the URL, the form, or storage.
    assert API_KEY not in page.evaluate("location.href + document.body.innerHTML")
    assert page.evaluate("localStorage.length + sessionStorage.length") == 0
    page.screenshot("admin-status")


def test_status_page_says_when_the_key_is_wrong(browser: Browser, demo_server: Any) -> None:
    page = browser.open(f"{demo_server.url}/admin")
    page.evaluate("document.getElementById('key').value = 'not-the-key'; "
                  "document.getElementById('form').requestSubmit()")
    status = page.wait_until(f"{STATUS}.className === 'err' && {STATUS}.textContent")
    assert status.startswith("Refused")
    page.screenshot("admin-refused")


def test_a_browser_event_source_gets_the_stream_and_resumes(browser: Browser, demo_server: Any) -> None:
    """A real EventSource (contract §4.2): events by name, ids, and after a drop the browser's
    own Last-Event-ID resumes with what it missed, once."""
    page = browser.open(f"{demo_server.url}/config")
    page.evaluate("""(() => { window.got = []; window.opens = 0;
      const source = new EventSource('/api/v1/stream?organizationId=org-a&token=tok-alice');
      source.onopen = () => { window.opens += 1; };
      source.addEventListener('news', (e) => window.got.push([e.lastEventId, JSON.parse(e.data)]));
      window.source = source; return true; })()""")
    page.wait_until("window.opens === 1")
    assert publish(demo_server, "org-a", "news", {"n": 1}).status_code == 202
    page.wait_until("window.got.length === 1")
    first_id, data = page.evaluate("window.got[0]")
    assert data == {"n": 1} and first_id.isdigit()
    # The server ends the stream (a disconnect of the user); what is published meanwhile
    # comes with the browser's reconnect, which sends Last-Event-ID by itself.
    assert requests.post(f"{demo_server.url}/api/v1/users/alice/disconnect",
                         headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5).status_code == 202
    assert publish(demo_server, "org-a", "news", {"n": 2}).status_code == 202
    page.wait_until("window.opens === 2 && window.got.length === 2", timeout=15)
    assert page.evaluate("window.got.map(g => g[1])") == [{"n": 1}, {"n": 2}]
