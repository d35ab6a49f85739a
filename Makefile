# Self-documenting Makefile: `make help` lists the targets. `make test` and `make demo` install first.
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA ?= data/synthetic
ME2 ?= data/synthetic_mindeye2
LOGS ?= runs
PORT ?= 6006
PYTEST_ARGS ?=
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: help install test test-fast demo bench lint tensorboard data clean

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[1m%-12s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --no-compile -e '.[dev]'  # no bytecode pass over 6 GB: 2 min, not 4-5
	@touch $(STAMP)

install: $(STAMP) ## Create .venv with the pinned dependencies (re-runs only when pyproject.toml changes)

test: install ## The complete suite (slow, DDP and service-backed tests included): what CI runs
	$(BIN)/python -m pytest -q --timeout 900 $(PYTEST_ARGS)

test-fast: install ## The quick loop: everything but the slow tests
	$(BIN)/python -m pytest -q -m "not slow" --timeout 300 $(PYTEST_ARGS)

$(DATA)/synthetic_nsd.json: | $(STAMP)
	$(BIN)/python -m experiments.make_synthetic_nsd --out $(DATA) --mindeye2-layout $(ME2)

data: install $(DATA)/synthetic_nsd.json ## Generate the synthetic NSD dataset (our format + MindEyeV2 layout) if absent

demo: install ## The main job on the embedded default: synthetic data, both stages (fits, test, ridge, reconstructions)
	$(BIN)/python -m experiments.demo --runs $(LOGS)

bench: install ## Benchmarks; JSON results in bench_results/
	$(BIN)/python -m experiments.bench --out bench_results --work data/bench

lint: install ## ruff
	$(BIN)/ruff check .

tensorboard: install ## Serve the TensorBoard logs under $(LOGS) on 127.0.0.1:$(PORT)
	$(BIN)/tensorboard --logdir $(LOGS) --host 127.0.0.1 --port $(PORT)

clean: ## Remove generated data and logs (keeps .venv)
	rm -rf data $(LOGS) .pytest_cache
