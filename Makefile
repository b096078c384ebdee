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

.PHONY: install run test test-all lint clean-outputs gpu-wheels gpu-data gpu-prepare gpu-check-cpu scaling scaling-quick

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

# The GPU check (benchmarks/README.md "GPU check"): fetch the wheels and stage the dev data that travel
# with the working tree to a bare CUDA machine (both folders git-ignored), then one device call runs
# `bash benchmarks/gpu_check.sh $OUT` there.
gpu-wheels:  ## .whl/: the cp312 wheels of benchmarks/gpu_check.lock (needs PyPI and a Python 3.12)
	PIP="$(PYTHON) -m pip" bash benchmarks/gpu_wheels.sh

gpu-data:  ## .gpu-data/: the dev data (../shared/data) with the longest side <= 256 px
	$(PYTHON) benchmarks/gpu_check.py stage-data

gpu-prepare: gpu-wheels gpu-data  ## both, and what travels, in bytes (the device tool's limit: 64 MiB)
	@echo "travels: $$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 cat 2>/dev/null | wc -c) bytes of working tree + $$(cat .whl/*.whl | wc -c) of wheels + $$(find .gpu-data -type f -print0 | xargs -0 cat | wc -c) of data"

gpu-check-cpu: install  ## the GPU check end to end on this CPU: tiny profile, every 10th dev image, no wheels
	$(BIN)/python benchmarks/gpu_check.py stage-data --dest /tmp/wsss-gpu-check-data --every 10
	PYTHON=$(BIN)/python SKIP_WHEELS=1 bash benchmarks/gpu_check.sh /tmp/wsss-gpu-check-cpu gpu-check-tiny \
	    --data /tmp/wsss-gpu-check-data

scaling-quick: install  ## benchmarks/scaling.py --quick -> benchmarks/results/scaling.{json,md} (~5 min)
	$(BIN)/python benchmarks/scaling.py --quick

scaling: install  ## the full scaling benchmark (<= 30 min on 2 quiet cores)
	$(BIN)/python benchmarks/scaling.py
