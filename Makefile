# Baton: two commands do all the set-up on a fresh Debian machine with python3 and make.
#   make run    -> Baton on its embedded default (NATS from the wheel, SQLite, all four services)
#   make test   -> lint, types and the whole test suite (unit, component, integration, e2e)

PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-stamp

.PHONY: setup run demo test browser lint typecheck pytest fmt lock schemas openapi bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock scripts/bootstrap.sh
	sh scripts/bootstrap.sh
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check -c requirements.lock -e '.[dev]'
	touch $(STAMP)

run: setup
	$(BIN)/baton up

demo: setup
	$(BIN)/baton up --demo

test: setup browser lint typecheck pytest

# Debian's chromium for the dashboard's browser tests (installed once, only for testing).
browser:
	sh scripts/bootstrap.sh --browser

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

pytest: setup
	$(BIN)/pytest $(PYTEST_ARGS)

fmt: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Refresh the pinned versions after changing dependencies in pyproject.toml.
lock: setup
	$(BIN)/python -m pip freeze --exclude-editable --disable-pip-version-check | grep -v '^-e ' > requirements.lock

# Rewrite the committed JSON Schema snapshots after an (additive) contract change.
schemas: setup
	$(BIN)/python -m libs.contracts.snapshots

# Rewrite the committed OpenAPI document of intake's HTTP API (docs/openapi/intake.json).
openapi: setup
	$(BIN)/python -m services.intake.openapi

# Throughput and latency next to the raw NATS limit (about a minute plus start-up): bench-results/<time>.json
bench: setup
	$(BIN)/baton bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
