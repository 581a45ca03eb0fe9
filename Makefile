# ardetect: `make run` and `make test` do all the set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed-stamp

export PATH := $(BIN):$(PATH)
export GX_ANALYTICS_ENABLED := False
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DO_NOT_TRACK := 1
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
# the first start of Prefect's ephemeral API server migrates its database: more than its 20-s default on a busy 2-core machine
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 180
export PYTHONUNBUFFERED := 1
# glibc malloc keeps freed memory instead of re-faulting it every training step (see MALLOC_ENV in src/ardetect/pipeline.py)
export MALLOC_MMAP_THRESHOLD_ ?= 33554432
export MALLOC_TRIM_THRESHOLD_ ?= 17179869184
export MALLOC_TOP_PAD_ ?= 1073741824

.PHONY: install run flow test test-fast bench clean-data help

help:
	@echo "make run    - set up .venv if missing, then run the whole pipeline (dvc repro under MLflow)"
	@echo "make test   - set up .venv if missing, then run the test suite"
	@echo "make flow   - run the pipeline as a Prefect flow"
	@echo "make bench  - run the CPU benchmarks in bench/"

# the installed environment takes about 7.5 GB (torch, onnxruntime-gpu, ...): refused up front on a fuller disk
MIN_FREE_GB ?= 8

$(STAMP): pyproject.toml
	@free=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); \
	if [ ! -x "$(BIN)/python" ] && [ "$$free" -lt $(MIN_FREE_GB) ]; then \
	  echo "cannot set up $(VENV): $$free GB free on $$(df -P . | awk 'NR==2 {print $$6}'), the environment needs about $(MIN_FREE_GB) GB (MIN_FREE_GB)"; exit 1; fi
	@# a venv whose python no longer runs (its interpreter removed or upgraded away) is made again from scratch
	@if [ -e "$(BIN)/python" ] || [ -L "$(BIN)/python" ]; then "$(BIN)/python" -c "" >/dev/null 2>&1 || { \
	  echo "$(VENV)/bin/python does not run (its interpreter is gone?): making $(VENV) again"; $(PYTHON) -m venv --clear $(VENV); }; fi
	@test -x "$(BIN)/python" || $(PYTHON) -m venv $(VENV)
	@# a venv whose creation was interrupted (Ctrl-C while ensurepip ran) has python but no pip: given it here
	@"$(BIN)/python" -m pip --version >/dev/null 2>&1 || { \
	  echo "$(VENV) has no pip (its set-up was interrupted?): installing it with ensurepip"; "$(BIN)/python" -m ensurepip --upgrade >/dev/null; }
	"$(BIN)/python" -m pip install -q --upgrade pip
	"$(BIN)/python" -m pip install -q -e '.[dev]'
	@# onnxruntime-gpu owns the onnxruntime module; plain onnxruntime must never sit beside it
	@! "$(BIN)/python" -m pip show -q onnxruntime 2>/dev/null || { echo "plain onnxruntime is installed beside onnxruntime-gpu"; exit 1; }
	touch $(STAMP)

install: $(STAMP)

run: install
	ard pipeline run

flow: install
	python flows/pipeline.py

# the suite's files side by side, one worker a core (the end-to-end pipeline files first: tests/conftest.py)
TEST_WORKERS ?= auto
PYTEST_PARALLEL := -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# the 15 slowest tests are listed at the end: where the suite's time goes, in every CI log
test: install
	python -m pytest -q --timeout=1200 --durations=15 $(PYTEST_PARALLEL)

test-fast: install
	python -m pytest -q -m "not slow" $(PYTEST_PARALLEL)

bench: install
	@# the GPU benchmark (bench/bench_model_gpu.py) is run on a GPU machine, not here
	@for b in bench/bench_*cpu*.py; do echo "== $$b"; python $$b || exit 1; done

clean-data:
	rm -rf data/exemplars data/generated data/tuples/*.parquet data/validation
