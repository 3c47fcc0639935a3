# `make run` and `make test` work on a fresh machine with Python 3.11+ and make: each creates
# .venv and installs what it needs on first use. `make run` installs token-proxy with its
# `speed` extra only; `make test` (and lint, typecheck) adds the test toolchain, the dev extra.
# Flags reach the proxy through ARGS: make run ARGS="--port 9000 --config proxy.toml".
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN_STAMP := $(VENV)/.installed-run
DEV_STAMP := $(VENV)/.installed-dev
ARGS ?=

.PHONY: install venv run test lint typecheck check soak bench reference clean

$(RUN_STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "token-proxy needs Python 3.11 or newer; set PYTHON=python3.11 (or newer) and try again")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[speed]'
	@touch $@

$(DEV_STAMP): $(RUN_STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,speed]'
	@touch $@

# .venv with what running needs.
install: $(RUN_STAMP)

# .venv for development: what running needs and the test toolchain.
venv: $(DEV_STAMP)

run: $(RUN_STAMP)
	$(BIN)/token-proxy run $(ARGS)

check: $(RUN_STAMP)
	$(BIN)/token-proxy check $(ARGS)

# README's configuration reference, from the settings model (a test fails when it is stale).
reference: $(RUN_STAMP)
	$(BIN)/python scripts/config_reference.py

# Not part of `make test`: token-proxy against nginx and a plain aiohttp proxy (see bench/README.md).
bench: $(RUN_STAMP)
	$(BIN)/python bench/run $(ARGS)

# Not part of `make test`: 1-second tokens for 5 minutes under 50 requests/s (see README).
soak: $(RUN_STAMP)
	$(BIN)/python bench/soak.py $(ARGS)

lint: $(DEV_STAMP)
	$(BIN)/ruff check proxy tests bench scripts docs bench/run
	$(BIN)/ruff format --check proxy tests bench scripts docs bench/run
	$(BIN)/hadolint Dockerfile

typecheck: $(DEV_STAMP)
	$(BIN)/mypy

# The store tests start a real redis-server, the egress tests a real tinyproxy, the bench test
# valgrind: Debian's packages are installed when they are missing.
test: $(DEV_STAMP) lint typecheck
	scripts/ensure-redis-server
	scripts/ensure-tinyproxy
	scripts/ensure-valgrind
	$(BIN)/pytest
	$(BIN)/pytest -q tests/functional --upstream-client aiohttp

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
