# Two entry points for a fresh machine: `make run` (the main job) and `make test`.
# Both create .venv and install the package with the tested pins (requirements/constraints.txt).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# postgres: psycopg for an Optuna storage on PostgreSQL (tests/test_tuning_postgres.py, README "Tuning").
EXTRAS ?= dev,postgres
export MLFLOW_DISABLE_TELEMETRY ?= true
export DVC_NO_ANALYTICS ?= 1
export GX_ANALYTICS_ENABLED ?= false
export HF_HUB_OFFLINE ?= 1

.PHONY: install run test test-all lint clean-outputs

$(VENV)/.installed: pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -c requirements/constraints.txt -e '.[$(EXTRAS)]'
	touch $@

install: $(VENV)/.installed  ## create .venv and install wsss + dev tools

run: install  ## the main job: `dvc repro` on the embedded default (synthetic data)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

test: install  ## the fast test suite (slow and gpu tests excluded)
	$(BIN)/python -m pytest -q

test-all: install  ## everything, including slow end-to-end tests
	$(BIN)/python -m pytest -q -m "not gpu"

lint: install
	$(BIN)/ruff check wsss tests benchmarks
