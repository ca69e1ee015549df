# Two set-up commands: `make repro` and `make test`. Both build .venv if it is missing.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: repro test lint bench clean-venv

$(BIN)/mergeloom: requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

repro: $(BIN)/mergeloom
	$(BIN)/dvc repro

test: $(BIN)/mergeloom
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q

bench: $(BIN)/mergeloom
	$(BIN)/python bench/merge_bench.py

clean-venv:
	rm -rf $(VENV)
