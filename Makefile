# orgcast — `make run` serves it, `make test` runs the whole suite.
# Both set up what is missing: the virtualenv, the packages, and the Debian
# packages of the servers the demo and the tests start (postgresql, redis,
# nginx).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
NPM_DIR := .cache/npm
CLIENT_JS := $(NPM_DIR)/node_modules/socket.io-client/dist/socket.io.min.js
# Exact version of the browser client fetched for the demo page and the JS tests.
SOCKETIO_CLIENT_VERSION := 4.8.1
# The Node.js emitters existing backends use, run by the tests (not by orgcast).
NPM_TEST_PKGS := @socket.io/redis-emitter@5.1.0 redis@4.7.0 @socket.io/postgres-emitter@0.1.1 pg@8.13.2
NPM_TEST_STAMP := $(NPM_DIR)/.test-packages-stamp

.PHONY: run test lint typecheck pytest system-deps test-deps apt-missing venv clean bench

run: system-deps venv $(CLIENT_JS)
	$(BIN)/python scripts/devrun.py --client-js $(CLIENT_JS)

test: test-deps venv $(CLIENT_JS) $(NPM_TEST_STAMP) lint typecheck pytest

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

# Debian packages, installed when missing (as root; otherwise named).
# run: PostgreSQL's server binaries, redis-server, npm (for the browser client).
# test: the same, plus Chromium for the demo page's browser test, nginx
# for the reverse-proxy test (it runs its own nginx, never the system one)
# and PgBouncer for the transaction-pool test (its own too).
RUN_PKGS  := postgresql redis-server npm
TEST_PKGS := $(RUN_PKGS) chromium nginx pgbouncer

system-deps:
	@$(MAKE) --no-print-directory apt-missing PKGS="$(RUN_PKGS)"

test-deps:
	@$(MAKE) --no-print-directory apt-missing PKGS="$(TEST_PKGS)"

apt-missing:
	@missing=""; \
	  for pkg in $(PKGS); do case $$pkg in \
	    postgresql) { command -v pg_config >/dev/null && test -x "$$(pg_config --bindir)/initdb"; } || \
	      ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql" ;; \
	    chromium) test -x /usr/bin/chromium || missing="$$missing chromium" ;; \
	    nginx) test -x /usr/sbin/nginx || missing="$$missing nginx" ;; \
	    pgbouncer) test -x /usr/sbin/pgbouncer || missing="$$missing pgbouncer" ;; \
	    *) command -v $$pkg >/dev/null || missing="$$missing $$pkg" ;; \
	  esac; done; \
	  if [ -n "$$missing" ]; then \
	    echo "installing:$$missing"; \
	    if [ "$$(id -u)" != 0 ]; then echo "run as root or install:$$missing" >&2; exit 1; fi; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  fi

# The official socket.io browser client, from the npm registry (not committed).
# One npm install for all of them: npm prunes what an earlier --no-save put there.
$(CLIENT_JS) $(NPM_TEST_STAMP):
	mkdir -p $(NPM_DIR)
	cd $(NPM_DIR) && npm install --silent --no-audit --no-fund --no-save \
	  socket.io-client@$(SOCKETIO_CLIENT_VERSION) $(NPM_TEST_PKGS) >/dev/null
	test -f $(CLIENT_JS)
	touch $(NPM_TEST_STAMP)

lint: venv
	$(BIN)/ruff check app tests scripts bench wsgi.py gunicorn.conf.py

typecheck: venv
	$(BIN)/mypy

# Two test processes by default (each starts its own Postgres, Redis and servers).
PYTEST_WORKERS ?= 2

pytest: venv
	$(BIN)/pytest -q -n $(PYTEST_WORKERS)

# bench also builds shared/tools/loadgen-c (in a temporary folder) with gcc.
bench: system-deps venv
	@$(MAKE) --no-print-directory apt-missing PKGS="gcc"
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache *.egg-info
