# One entry per task. `make run` and `make test` work on a fresh Debian machine with Python 3.11.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: run test lint typecheck bench clean db-upgrade

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

## make run: create .venv, install, migrate the embedded SQLite database, run the daemon in the foreground
run: $(STAMP)
	$(BIN)/refloop db upgrade
	$(BIN)/refloop serve

## make test: create .venv with dev dependencies and run the whole suite
test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check refloop tests bench

typecheck: $(STAMP)
	$(BIN)/mypy refloop

## make bench: the benchmark harness (numbers go to bench/results/; method and latest figures: docs/performance.md)
bench: $(STAMP)
	$(BIN)/python -m bench

db-upgrade: $(STAMP)
	$(BIN)/refloop db upgrade

clean:
	rm -rf $(VENV) var .pytest_cache .hypothesis
