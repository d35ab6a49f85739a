# Self-documenting Makefile: `make help` lists the targets. `make test` and `make demo` install first.
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA ?= data/synthetic
ME2 ?= data/synthetic_mindeye2
IMPORTED ?= data/synthetic_imported
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
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP) ## Create .venv with the pinned dependencies (re-runs only when pyproject.toml changes)

test: install ## The complete suite (slow, DDP and service-backed tests included): what CI runs
	$(BIN)/python -m pytest -q --timeout 900 $(PYTEST_ARGS)

test-fast: install ## The quick loop: everything but the slow tests
	$(BIN)/python -m pytest -q -m "not slow" --timeout 300 $(PYTEST_ARGS)

$(DATA)/synthetic_nsd.json: | $(STAMP)
	$(BIN)/python -m experiments.make_synthetic_nsd --out $(DATA) --mindeye2-layout $(ME2)

data: install $(DATA)/synthetic_nsd.json ## Generate the synthetic NSD dataset (our format + MindEyeV2 layout) if absent

TINY := data/tiny_models
STAGE1_TINY := --config configs/base/trainer.yaml --config configs/stage1/tiny_synthetic.yaml
DEMO_RUN := $(LOGS)/stage1_tiny/demo

$(TINY)/image_encoder/config.json: | $(STAMP)
	$(BIN)/python -m experiments.make_tiny_models --out $(TINY)

$(DATA)/targets/clip_text/meta.json: $(DATA)/synthetic_nsd.json $(TINY)/image_encoder/config.json
	$(BIN)/python -m experiments.cache_targets --data $(DATA) --subjects 1 2 3 --text-model $(TINY) \
		--image-model $(TINY)/image_encoder

demo: data $(DATA)/targets/clip_text/meta.json ## The main job on the embedded default: stage 1 fit + test vs ridge
	$(BIN)/python -m experiments.prepare_nsd --mindeye2-root $(ME2) --out $(IMPORTED) --subjects 1 2 3 --quiet
	rm -rf $(DEMO_RUN)
	$(BIN)/python -m experiments.run fit $(STAGE1_TINY) --trainer.logger.init_args.version=demo
	$(BIN)/python -m experiments.run test $(STAGE1_TINY) --trainer.logger.init_args.version=demo \
		--ckpt_path $(DEMO_RUN)/checkpoints/last.ckpt
	$(BIN)/python -m experiments.ridge_baseline $(STAGE1_TINY) --compare $(DEMO_RUN)/test_metrics.json
	@echo "TensorBoard logs and checkpoints: $(DEMO_RUN)  (serve with: make tensorboard)"

bench: install ## Benchmarks; JSON results in bench_results/
	$(BIN)/python -m experiments.bench --out bench_results --work data/bench

lint: install ## ruff
	$(BIN)/ruff check .

tensorboard: install ## Serve the TensorBoard logs under $(LOGS) on 127.0.0.1:$(PORT)
	$(BIN)/tensorboard --logdir $(LOGS) --host 127.0.0.1 --port $(PORT)

clean: ## Remove generated data and logs (keeps .venv)
	rm -rf data $(LOGS) .pytest_cache
