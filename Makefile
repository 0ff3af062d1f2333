# The two commands of the README: `make run` and `make test`. Both work on a fresh Debian machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= config/ticketgate.dev.toml
# Services the test suite talks to for real.
TEST_SERVICES := rabbitmq postgresql chromium swaks dovecot promtool

.PHONY: run test setup services lint typecheck bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

run: setup
	scripts/ensure-services.sh rabbitmq
	$(BIN)/ticketgate run --config $(CONFIG)

test: setup
	scripts/ensure-services.sh $(TEST_SERVICES)
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check core gateway connectors normalizers dedupe tests bench
	$(BIN)/lint-imports
	$(BIN)/mypy

bench: setup
	scripts/ensure-services.sh rabbitmq
	$(BIN)/python bench/ingest.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
