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
WORKERS ?= 2#                test processes of make test (pytest-xdist; a test file runs whole in one of them)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

# Slurm array jobs (`make slurm-*`; experiments/slurm/). Every task gets NODES x DEVICES srun tasks (one per GPU).
PROFILE ?= nsd#              nsd: the paper-scale configs; tiny: the synthetic data and tiny models
NAME ?=#                     experiment name prefix (default: PROFILE): runs go to $(LOGS)/<NAME>_<sweep>/<task>-<label>
SUBJECTS ?=#                 stage-1 / stage-2 subjects (default: the profile's, nsd: subj01 subj02 subj05 subj07)
TARGETS ?= image text#       stage-1 targets
B_SIZES ?= 256 512 1024 2048# bottleneck widths (slurm-bottleneck)
NEW_SUBJECTS ?= subj02 subj05 subj07# transfer targets (slurm-cross-subject), each from SOURCE_SUBJECT's stage-1 model
SOURCE_SUBJECT ?= subj01
TRANSFER_SESSIONS ?= 1#      the new subjects' first N sessions (slurm-cross-subject; empty: all)
INIT_FROM ?=#                a stage-1 checkpoint to transfer from instead (one target)
STAGE1_JOB ?=#               job id of a submitted stage-1 array: slurm-stage2 / slurm-cross-subject wait for it
NODES ?= 1
DEVICES ?= 1#                srun tasks (= GPUs = Lightning devices) per node
GPUS ?=#                     GPUs per node (default: DEVICES; 0 on CPU-only nodes)
CPUS ?= 8#                   CPUs per srun task
MEM ?=#                      memory per node (e.g. 128G; default: the partition's)
PARTITION ?=
ACCOUNT ?=
WALLTIME ?= 24:00:00
SIGNAL_S ?= 90#              SIGUSR1 this long before the time limit: Lightning saves hpc_ckpt_* and requeues
MAX_PARALLEL ?=#             at most this many array tasks at once
SBATCH_ARGS ?=#              more sbatch options
ARGS ?=#                     CLI overrides for every task, e.g. ARGS='--trainer.max_epochs=10'
STAGE1_ARGS ?=
STAGE2_ARGS ?=
DRY_RUN ?=#                  DRY_RUN=1: write the sweep files and print the sbatch calls instead of submitting
shq = '$(subst ','\'',$(1))'
SLURM := $(BIN)/python -m experiments.slurm --profile $(PROFILE) --name=$(call shq,$(NAME)) --logs $(LOGS) \
	--subjects $(SUBJECTS) --targets $(TARGETS) --stage1-job=$(call shq,$(STAGE1_JOB)) \
	--nodes $(NODES) --devices $(DEVICES) --gpus=$(call shq,$(GPUS)) --cpus $(CPUS) --mem=$(call shq,$(MEM)) \
	--partition=$(call shq,$(PARTITION)) --account=$(call shq,$(ACCOUNT)) --time $(WALLTIME) --signal-s $(SIGNAL_S) \
	--max-parallel=$(call shq,$(MAX_PARALLEL)) --sbatch-args=$(call shq,$(SBATCH_ARGS)) --args=$(call shq,$(ARGS)) \
	--stage1-args=$(call shq,$(STAGE1_ARGS)) --stage2-args=$(call shq,$(STAGE2_ARGS)) \
	$(if $(filter-out 0 no false,$(DRY_RUN)),--dry-run)

.PHONY: help install test test-fast demo bench gpu-check lint tensorboard data clean world
.PHONY: slurm-stage1 slurm-stage2 slurm-pipeline slurm-bottleneck slurm-cross-subject

help: ## List the targets (Slurm variables: see the top of the Makefile)
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  \033[1m%-20s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --no-compile -e '.[dev]'  # no bytecode pass over 6 GB: 2 min, not 4-5
	$(BIN)/python -m experiments.precompile  # bytecode of what the project imports, so no process start recompiles it
	@touch $(STAMP)

install: $(STAMP) ## Create .venv with the pinned dependencies (re-runs only when pyproject.toml changes)

test: install ## The complete suite (slow, DDP and service-backed tests included): what CI runs
	$(BIN)/python -m pytest -q --timeout 900 -n $(WORKERS) --dist loadfile $(PYTEST_ARGS)

test-fast: install ## The quick loop: everything but the slow tests
	$(BIN)/python -m pytest -q -m "not slow" --timeout 300 -n $(WORKERS) --dist loadfile $(PYTEST_ARGS)

$(DATA)/synthetic_nsd.json: | $(STAMP)
	$(BIN)/python -m experiments.make_synthetic_nsd --out $(DATA) --mindeye2-layout $(ME2)

data: install $(DATA)/synthetic_nsd.json ## Generate the synthetic NSD dataset (our format + MindEyeV2 layout) if absent

demo: install ## The main job on the embedded default: synthetic data, both stages (fits, test, ridge, reconstructions)
	$(BIN)/python -m experiments.demo --runs $(LOGS)

world: install ## Train the learned miniature world (CLIP, VAE, SDXL-shaped UNet, IP-Adapter) into data/world
	$(BIN)/python -m experiments.make_world --out data/world

.PHONY: studies
studies: install ## The studies on the learned world (after make demo): ablations, temporal router, bottleneck, transfer, spatial control (both routers)
	$(BIN)/python -m experiments.demo --runs $(LOGS) --routers reference --stage1-only  # the value encoders they read
	$(BIN)/python -m experiments.ablation_study --data $(DATA) --out $(LOGS)/ablation_study \
	--image-encoder $(LOGS)/stage1_world_image/demo/checkpoints/last.ckpt \
	--text-encoder $(LOGS)/stage1_world_text/demo/checkpoints/last.ckpt
	$(BIN)/python -m experiments.temporal_router_study --out $(LOGS)/studies/temporal_router
	$(BIN)/python -m experiments.bottleneck_study --data $(DATA) --out $(LOGS)/studies/bottleneck
	$(BIN)/python -m experiments.transfer_study --data $(DATA) --out $(LOGS)/studies/transfer --stage2 --target clip_image
	$(BIN)/python -m experiments.transfer_study --data $(DATA) --out $(LOGS)/studies/transfer_unit --stage2 \
	--target clip_image -- --model.init_args.moe.init_args.scoring=unit
	$(BIN)/python -m experiments.transfer_study --data $(DATA) --out $(LOGS)/studies/transfer_dense --stage2 \
	--target clip_image -- --model.init_args.moe.init_args.capacity_factor=2.0
	$(BIN)/python -m experiments.spatial_control_study --out $(LOGS)/studies/spatial_control --data $(DATA) \
	--predict $(LOGS)/studies/temporal_router/kl_0.1/test_brain/reconstructions \
	--image-encoder $(LOGS)/stage1_world_image/demo/checkpoints/last.ckpt \
	--text-encoder $(LOGS)/stage1_world_text/demo/checkpoints/last.ckpt
	$(BIN)/python -m experiments.spatial_control_study --out $(LOGS)/studies/spatial_control_unit --data $(DATA) \
	--predict $(LOGS)/studies/temporal_router/kl_0.1_unit/test_brain/reconstructions \
	--image-encoder $(LOGS)/studies/temporal_router/stage1/clip_image_unit/run/checkpoints/last.ckpt \
	--text-encoder $(LOGS)/studies/temporal_router/stage1/clip_text_unit/run/checkpoints/last.ckpt
	$(BIN)/python -m experiments.spatial_control_study --out $(LOGS)/studies/spatial_control_dense --data $(DATA) \
	--predict $(LOGS)/studies/temporal_router/kl_0.1_dense/test_brain/reconstructions \
	--image-encoder $(LOGS)/studies/temporal_router/stage1/clip_image_value_cap2/run/checkpoints/last.ckpt \
	--text-encoder $(LOGS)/studies/temporal_router/stage1/clip_text_value_cap2/run/checkpoints/last.ckpt

bench: install ## Benchmarks; JSON results in bench_results/
	$(BIN)/python -m experiments.bench --only data stage1 stage2 conditions callbacks startup slurm --out bench_results --work data/bench

gpu-check: install ## Paper scale on one GPU (<= 8 min): stage-1 fit/forward, SDXL-sized stage-2 steps, generation -> bench_results/gpu_check.json
	$(BIN)/python -m experiments.gpu_check --out bench_results/gpu_check.json

lint: install ## ruff
	$(BIN)/ruff check .

tensorboard: install ## Serve the TensorBoard logs under $(LOGS) on 127.0.0.1:$(PORT)
	$(BIN)/tensorboard --logdir $(LOGS) --host 127.0.0.1 --port $(PORT)

clean: ## Remove generated data and logs (keeps .venv)
	rm -rf data $(LOGS) .pytest_cache

slurm-stage1: install ## Slurm array: stage 1 over SUBJECTS x TARGETS (PROFILE, NODES, DEVICES, CPUS, PARTITION...; DRY_RUN=1 prints)
	$(SLURM) stage1

slurm-stage2: install ## Slurm: stage 2, one job per subject, afterok on its stage-1 tasks of array STAGE1_JOB
	$(SLURM) stage2

slurm-pipeline: install ## Slurm: the stage-1 array, then stage 2 per subject depending on its stage-1 tasks
	$(SLURM) pipeline

slurm-bottleneck: install ## Slurm array: stage 1 over SUBJECTS x TARGETS x B_SIZES (model.init_args.b_size)
	$(SLURM) bottleneck --b-sizes $(B_SIZES)

slurm-cross-subject: install ## Slurm array: NEW_SUBJECTS from SOURCE_SUBJECT's stage-1 model (init_from; after STAGE1_JOB)
	$(SLURM) cross-subject --new-subjects $(NEW_SUBJECTS) --source-subject $(SOURCE_SUBJECT) --init-from=$(call shq,$(INIT_FROM)) \
	--transfer-sessions=$(call shq,$(TRANSFER_SESSIONS))
