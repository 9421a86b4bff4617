# flaresweep — `make help` lists the targets. Every Python target sets up .venv on first use.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.flaresweep-installed
# Every package at the version of a known-good environment (`make lock` refreshes it): two cluster
# nodes, or a rerun next month, install the same versions, and results record them.
LOCK   := requirements.lock

# Sweep knobs: `make sweep SPACE=table1 DATA=/data/Flare7k BACKGROUNDS=/data/Flickr24K CKPT=/ckpt/flare7k/net_g_last.pth TEST_DATA=/data/Flare7Kpp/test_data/real`
SPACE    ?= demo
DATA     ?=
BACKGROUNDS ?=
TEST_DATA ?=
CKPT     ?=
BASE_KIND ?=
STORAGE  ?=
SEEDS    ?=
PROTOCOL ?=
EVAL_MODE ?=
EVAL_SIZE ?=
SWEEP_ARGS ?=
TABLE_ARGS ?=
SPACE_FILE := search_spaces/$(SPACE).yaml
# What defines the cells (sweep, status and table1 alike); SWEEP_ARGS go to `sweep.py run` only.
SPACE_OPTS := --space $(SPACE_FILE) $(if $(DATA),--data $(DATA)) $(if $(BACKGROUNDS),--backgrounds $(BACKGROUNDS)) $(if $(TEST_DATA),--test-data $(TEST_DATA)) $(if $(CKPT),--checkpoint $(CKPT)) $(if $(BASE_KIND),--base-kind $(BASE_KIND)) $(if $(SEEDS),--seeds $(SEEDS)) $(if $(PROTOCOL),--protocol $(PROTOCOL)) $(if $(EVAL_MODE),--eval-mode $(EVAL_MODE)) $(if $(EVAL_SIZE),--eval-size $(EVAL_SIZE))
# The reference check's inputs (its modes and protocols: all; EVAL_SIZE: the views' side).
CHECK_OPTS := --space $(SPACE_FILE) $(if $(DATA),--data $(DATA)) $(if $(BACKGROUNDS),--backgrounds $(BACKGROUNDS)) $(if $(TEST_DATA),--test-data $(TEST_DATA)) $(if $(CKPT),--checkpoint $(CKPT)) $(if $(BASE_KIND),--base-kind $(BASE_KIND)) $(if $(EVAL_SIZE),--eval-size $(EVAL_SIZE))
SWEEP_OPTS := $(SPACE_OPTS) $(if $(STORAGE),--storage $(STORAGE)) $(SWEEP_ARGS)

.PHONY: help setup lock sweep table1 status reference-check test test-fast lint bench gpu-check horovod clean distclean

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  make %-16s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "  Variables: SPACE=$(SPACE) (search_spaces/<SPACE>.yaml), DATA=, BACKGROUNDS=, TEST_DATA=, CKPT=, BASE_KIND=, SEEDS=, PROTOCOL=, EVAL_MODE=, EVAL_SIZE=, STORAGE=, SWEEP_ARGS= (run), TABLE_ARGS= (table1)"

$(STAMP): pyproject.toml $(LOCK)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps -e '.[dev]'
	@touch $@

setup: $(STAMP) ## Create .venv and install flaresweep with its dependencies from requirements.lock (once)

lock: ## Refresh requirements.lock from a fresh install of pyproject.toml's (lower-bound) dependencies
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet --upgrade pip
	.venv-lock/bin/python -m pip install --quiet '.[dev]'
	{ echo "# flaresweep's environment, pinned (make lock writes it; make setup installs it)."; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable | grep -v '^flaresweep'; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK) && rm -rf .venv-lock

sweep: $(STAMP) ## Run (or resume) the sweep SPACE (default: the embedded CPU demo)
	$(PY) sweep.py run $(SWEEP_OPTS)

table1: $(STAMP) ## Write Table 1 (CSV, LaTeX), differences and figures for SPACE into results/<name>/<evaluation>/
	$(PY) sweep.py table1 $(SPACE_OPTS) $(TABLE_ARGS)

status: $(STAMP) ## One line per cell of SPACE as written: done / running / failed / stopped / interrupted / trained / pending
	$(PY) sweep.py status $(SPACE_OPTS)

reference-check: $(STAMP) ## Evaluate SPACE's reference under every 128-px reading vs the paper's row (results/<name>/reference_check.*)
	$(PY) -m reports.reference_check $(CHECK_OPTS)

test: $(STAMP) ## Run every test, slow end-to-end ones included (what CI runs)
	$(PY) -m pytest

test-fast: $(STAMP) ## Run the tests, skipping the slow end-to-end ones
	$(PY) -m pytest -m "not slow"

lint: $(STAMP) ## ruff over the code
	$(PY) -m ruff check .

bench: $(STAMP) ## Run the benchmarks in bench/ (prints side-by-side ratios)
	@for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

gpu-check: $(STAMP) ## Measure what only a GPU can show, <= 5 min (OUT=gpu_check_out; docs/performance.md "On a GPU")
	PYTHON=$(PY) bash bench/gpu_check.sh

horovod: $(STAMP) ## Build Horovod 0.28.1 (patched for C++20) into .venv; optional backend
	bash scripts/build_horovod.sh $(PY)

clean: ## Remove generated results (keeps .venv and caches)
	find results -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +

distclean: clean ## Also remove .venv and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache
