# The two commands of the README: `make up` (pools + Flower + demo) and `make test` (everything CI runs).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: up test brokers postgres install

up: install brokers postgres
	$(BIN)/postroom up --demo

test: install brokers postgres
	bash scripts/browser.sh
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest

brokers:
	bash scripts/brokers.sh

postgres:  # the assets service's database; `postroom up` migrates it
	bash scripts/postgres.sh

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@
