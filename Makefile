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

.PHONY: run test test-slow bench bench-early realism install clean up down serve-flows

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	# torch first, pinned: anything looser (or torch pulled in by another package) fetches a CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The nightly Prefect flow, embedded (ephemeral Prefect, sqlite MLflow, local DVC cache, the simulator): ingest,
# preprocess, version with DVC, train, baseline, evaluate, register, promote, classify the night's objects.
run: install
	$(BIN)/deeprubin nightly

# Local Prefect (127.0.0.1:4200) and MLflow (127.0.0.1:5000) servers; `make serve-flows` serves the schedules.
up: install
	$(BIN)/deeprubin up

down: install
	$(BIN)/deeprubin down

serve-flows: install
	PREFECT_API_URL=http://127.0.0.1:4200/api MLFLOW_TRACKING_URI=http://127.0.0.1:5000 $(BIN)/deeprubin serve-flows

test: install
	$(BIN)/python -m pytest

test-slow: install
	$(BIN)/python -m pytest -m slow

bench: install
	$(BIN)/python bench/simulate_speed.py
	$(BIN)/python bench/alerce_pull.py
	$(BIN)/python bench/gp.py
	$(BIN)/python bench/preprocess.py
	$(BIN)/python bench/baseline_bts.py
	$(BIN)/python bench/classify_throughput.py --memory 100000
	$(BIN)/python bench/serve_latency.py

# Early classification of the served model on the real BTS supernovae, alert by alert (needs a champion: make run).
bench-early: install
	$(BIN)/python bench/early_replay.py

realism: install
	$(BIN)/python bench/realism.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
