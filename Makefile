# The two README commands: `make run` (the main job) and `make test` (the test suite).
# Each creates .venv if missing and installs what it needs; reinstalling only when pyproject.toml or
# constraints.txt changed.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Offline hygiene: no telemetry from any tool.
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: run test test-slow bench realism install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	# torch first, pinned: anything looser (or torch pulled in by another package) fetches a CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/deeprubin ingest
	$(BIN)/deeprubin preprocess
	$(BIN)/deeprubin train
	$(BIN)/deeprubin baseline
	$(BIN)/deeprubin evaluate
	$(BIN)/deeprubin register

test: install
	$(BIN)/python -m pytest

test-slow: install
	$(BIN)/python -m pytest -m slow

bench: install
	$(BIN)/python bench/simulate_speed.py
	$(BIN)/python bench/alerce_pull.py
	$(BIN)/python bench/gp.py
	$(BIN)/python bench/baseline_bts.py

realism: install
	$(BIN)/python bench/realism.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
