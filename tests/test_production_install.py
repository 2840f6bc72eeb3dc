"""The deployment the README documents: a fresh virtualenv, ``pip install`` of a
clone (no extras, not editable), then the production command. The test tools
(pytest brings ``packaging``, for one) must not be what makes it start."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import socketio
from conftest import API_KEY, ROOT, base_env
from throwaway import free_port, terminate, wait_port

pytestmark = pytest.mark.slow

#: what a clone holds that a deployment needs (no .venv, .cache, .git)
IGNORED = shutil.ignore_patterns(".venv", ".cache", ".git", "__pycache__", "*.egg-info", "build",
                                 ".pytest_cache", ".mypy_cache", ".ruff_cache", "node_modules",
                                 "bench", ".devdata")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: Any) -> Path:
    """A virtualenv holding ``pip install <clone>`` and nothing else; return its bin/."""
    root = tmp_path_factory.mktemp("production")
    clone = root / "orgcast"
    shutil.copytree(ROOT, clone, ignore=IGNORED)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                          "--disable-pip-version-check", str(clone)],
                         capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    return venv / "bin"


def test_no_test_tool_is_installed(installed: Path) -> None:
    out = subprocess.run([str(installed / "python"), "-m", "pip", "list", "--format=json"],
                         capture_output=True, text=True, check=True)
    names = {p["name"].lower() for p in json.loads(out.stdout)}
    assert "orgcast" in names
    assert not names & {"pytest", "mypy", "ruff", "websocket-client", "requests"}


def test_the_readme_production_command_serves(installed: Path, postgres: Any, tmp_path: Path) -> None:
    # Only the two files of the README's command, so that `app` is the
    # installed package (its templates included), not the source tree.
    workdir = tmp_path / "deploy"
    workdir.mkdir()
    for name in ("wsgi.py", "gunicorn.conf.py"):
        shutil.copy(ROOT / name, workdir / name)
    port = free_port()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "BIND": f"127.0.0.1:{port}",
           **base_env(postgres)}
    log_path = tmp_path / "gunicorn.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([str(installed / "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"],
                                cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_port(port, time.monotonic() + 30, proc)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                reply = requests.get(url + "/healthz", timeout=2)
                break
            except requests.ConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.1)
        assert reply.status_code == 200, log_path.read_text()
        assert reply.json() == {"status": "ok"}
        # ... and it does its job: a socket is admitted and receives an event.
        client = socketio.Client(reconnection=False)
        received: list[Any] = []
        client.on("news", lambda data, *offset: received.append(data))
        client.connect(url, transports=["websocket"], wait_timeout=10,
                       auth={"token": "tok-alice", "organizationId": "org-a"})
        try:
            assert requests.post(f"{url}/api/v1/organizations/org-a/events",
                                 json={"event": "news", "data": "from a production install"},
                                 headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5).status_code == 202
            deadline = time.monotonic() + 5
            while not received and time.monotonic() < deadline:
                time.sleep(0.02)
            assert received == ["from a production install"]
        finally:
            client.disconnect()
        assert "Traceback" not in log_path.read_text()
    finally:
        terminate(proc)
