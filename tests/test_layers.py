"""The house rules on imports: no work at import time, services free of
frameworks and drivers, one direction (edges -> services -> data access).
Each check runs in a fresh interpreter, like gunicorn's
tests/workers/test_gevent_import_order.py, so sys.modules is honest."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
APP_MODULES = sorted(
    ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    for p in (ROOT / "app").rglob("*.py")
)
DRIVERS = ("flask", "socketio", "engineio", "psycopg2", "redis", "gevent", "werkzeug")


def run_python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin"}, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_every_app_module_imports_without_environment_or_side_effects() -> None:
    code = (
        "import importlib, threading, sys\n"
        f"for name in {APP_MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        "assert threading.active_count() == 1, threading.enumerate()\n"
        "print('gevent.monkey' in sys.modules and __import__('gevent.monkey').monkey.saved)\n"
    )
    assert run_python(code).strip() in ("False", "{}")


@pytest.mark.parametrize("service", ["app.auth.checker", "app.publish.service"])
def test_services_import_no_framework_or_driver(service: str) -> None:
    loaded = run_python(f"import sys, {service}\nprint(' '.join(sorted(sys.modules)))").split()
    assert not [m for m in loaded if m.split(".")[0] in DRIVERS]


def test_gunicorn_master_imports_nothing_heavy_before_the_worker_patches() -> None:
    # gunicorn.conf.py and the worker class are imported in the master,
    # before gevent patches the worker: neither may pull in the app's stack.
    code = (
        "import sys, runpy, os\n"
        "os.environ['DATABASE_URL'] = 'postgresql://x@127.0.0.1/x'\n"
        "runpy.run_path('gunicorn.conf.py')\n"
        "import app.serving\n"
        "print(' '.join(sorted(sys.modules)))\n"
    )
    loaded = set(run_python(code).split())
    # (ssl is not in the list: gunicorn's own gevent worker imports it there.)
    assert not loaded & {"flask", "socketio", "engineio", "psycopg2", "redis", "psycogreen"}


#: Every module of app/ and its layer; a module missing here fails the test below.
LAYERS = {
    "app.http": "edge", "app.serving": "edge",
    # the forked transports, and the two realtime modules that speak Socket.IO through them
    "app.transport": "edge", "app.realtime.namespace": "edge", "app.realtime.connect": "edge",
    "app.realtime.fanout": "edge",
    # the features: they know neither HTTP nor a transport
    "app.realtime.expiry": "service", "app.realtime.recovery": "service", "app.realtime.stats": "service",
    "app.realtime.presence": "service", "app.realtime.revalidate": "service", "app.realtime.webhooks": "service",
    "app.realtime.background": "service",
    "app.publish.pg_notify": "edge", "app.publish.redis_emitter": "edge", "app.publish.emitters": "edge",
    "app.auth.checker": "service", "app.publish.service": "service",
    "app.db": "data", "app.auth.store": "data", "app.auth.ratelimit": "data", "app.bus": "data",
    # prometheus-client behind the observers the services and the bus declare
    "app.metrics": "data",
    "app.config": "leaf", "app.errors": "leaf", "app.log": "leaf", "app.gather": "leaf", "app.process": "leaf",
    "app.auth.credentials": "leaf", "app.rooms": "leaf", "app.timers": "leaf",
    # packages whose __init__ holds only a docstring
    "app.auth": "leaf", "app.publish": "leaf", "app.realtime": "leaf",
}
RANK = {"edge": 0, "service": 1, "data": 2, "leaf": 3}


def layer_of(module: str) -> str | None:
    """The layer of a module: its own entry, else its package's (longest prefix)."""
    best = None
    for prefix, name in LAYERS.items():
        if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, name)
    return best[1] if best else None


def test_every_module_has_a_layer() -> None:
    unclassified = [m for m in APP_MODULES if m != "app" and layer_of(m) is None]
    assert not unclassified, f"add these modules to LAYERS: {unclassified}"


def test_imports_flow_one_way() -> None:
    """Data access never imports services or edges; services never import edges;
    leaves import only leaves."""
    problems = []
    for path in (ROOT / "app").rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        if module == "app":
            continue  # the factory wires every layer
        mine = layer_of(module)
        assert mine is not None, f"{module} has no layer"
        for line in path.read_text().splitlines():
            words = line.split()
            if len(words) >= 4 and words[:2] == ["from", "app"] and words[2] == "import":
                words = ["from", f"app.{words[3].rstrip(',')}"]  # from app import process: the module app.process
            if len(words) >= 2 and words[0] in ("from", "import") and words[1].startswith("app."):
                theirs = layer_of(words[1])
                assert theirs is not None, f"{module} imports {words[1]}, which has no layer"
                if RANK[theirs] < RANK[mine]:
                    problems.append(f"{module} ({mine}) imports {words[1]} ({theirs})")
    assert not problems
