# `make run` and `make test` work on a fresh machine with Python 3.11+ and make:
# each creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv run test lint typecheck check soak bench reference clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "token-proxy needs Python 3.11 or newer; set PYTHON=python3.11 (or newer) and try again")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,speed]'
	@touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/token-proxy run

check: $(STAMP)
	$(BIN)/token-proxy check

# README's configuration reference, from the settings model (a test fails when it is stale).
reference: $(STAMP)
	$(BIN)/python scripts/config_reference.py

# Not part of `make test`: token-proxy against nginx and a plain aiohttp proxy (see bench/README.md).
bench: $(STAMP)
	$(BIN)/python bench/run

# Not part of `make test`: 1-second tokens for 5 minutes under 50 requests/s (see README).
soak: $(STAMP)
	$(BIN)/python bench/soak.py

lint: $(STAMP)
	$(BIN)/ruff check proxy tests bench scripts docs bench/run
	$(BIN)/ruff format --check proxy tests bench scripts docs bench/run
	$(BIN)/hadolint Dockerfile

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest
	$(BIN)/pytest -q tests/functional --upstream-client aiohttp

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
