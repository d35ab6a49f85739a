"""Shared fixtures: generated datasets (our format and the MindEyeV2 layout), offline environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tiny models: one intra-op thread per process is faster than two (no fork-join overhead on small ops), and the
# subprocess tests (two DDP ranks, Slurm tasks) inherit it, so they do not oversubscribe the cores
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from datamodules.synthetic import SyntheticNSDConfig, generate, simulate, write_mindeye2_layout  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

SMALL = SyntheticNSDConfig(seed=3, voxels=(300, 240, 360), num_sessions=3, trials_per_session=90,
                           num_test_images=20, image_size=32)


@pytest.fixture(scope="session")
def small_sim():
    """The small synthetic dataset in memory (3 subjects, 3 sessions of 90 trials, 20 shared test images)."""
    return simulate(SMALL)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory, small_sim) -> Path:
    """The small synthetic dataset written in our shard format."""
    root = tmp_path_factory.mktemp("synthetic")
    generate(SMALL, root, small_sim)
    return root


@pytest.fixture(scope="session")
def small_mindeye2(tmp_path_factory, small_sim) -> Path:
    """The same data in the MindEyeV2 release layout."""
    return write_mindeye2_layout(small_sim, tmp_path_factory.mktemp("mindeye2"))


def tiny_mindeye2(root: Path, seed: int = 0) -> Path:
    """A one-subject MindEyeV2 layout for bad-input tests (fast to write, cheap to corrupt)."""
    cfg = SyntheticNSDConfig(seed=seed, voxels=(64,), num_sessions=2, trials_per_session=30, num_test_images=5,
                             image_size=16)
    return write_mindeye2_layout(simulate(cfg), root)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    """Tiny random CLIP image/text models and a tiny SDXL-shaped pipeline in one local directory (32-wide
    targets, 64-wide cross-attention)."""
    from experiments.world.tiny_models import make_tiny_clip, make_tiny_sdxl

    return make_tiny_sdxl(make_tiny_clip(tmp_path_factory.mktemp("tiny_models"), embed_dim=32, image_size=32))


@pytest.fixture(scope="session")
def targets(small_data, tiny_models) -> Path:
    """Image and text target caches of the small synthetic dataset under ``small_data/targets``."""
    from experiments.caching.targets import cache_targets

    cache_targets(small_data, [1, 2, 3], small_data / "targets", image_model=str(tiny_models / "image_encoder"),
                  text_model=str(tiny_models))
    return small_data / "targets"


def _fit_stage1(data: Path, logs: Path, target: str) -> Path:
    """A short tiny stage-1 fit whose prior also learns the expert embeddings; returns its last checkpoint."""
    from experiments.run import cli_main

    repo = Path(__file__).resolve().parent.parent
    cli_main(["fit", "--config", str(repo / "configs/base/trainer.yaml"),
              "--config", str(repo / "configs/stage1/tiny_synthetic.yaml"),
              f"--data.init_args.data_dir={data}", f"--data.init_args.targets={{{target}: targets/{target}}}",
              "--data.init_args.val_images=8", f"--data.init_args.val_cache_dir={logs / 'val_cache'}",
              "--data.init_args.samples_per_epoch=192", f"--model.init_args.target={target}",
              "--model.init_args.prior_inputs=[mean, experts]", f"--trainer.default_root_dir={logs}",
              f"--trainer.logger.init_args.save_dir={logs}", "--trainer.logger.init_args.version=run",
              "--trainer.enable_progress_bar=false", "--trainer.max_epochs=2",
              "--trainer.check_val_every_n_epoch=1"])
    return logs / "stage1_tiny" / "run" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def stage1_checkpoints(small_data, targets, tmp_path_factory) -> dict[str, Path]:
    """Tiny stage-1 checkpoints of the small dataset: ``image`` (clip_image) and ``text`` (clip_text) targets."""
    return {"image": _fit_stage1(small_data, tmp_path_factory.mktemp("stage1_image"), "clip_image"),
            "text": _fit_stage1(small_data, tmp_path_factory.mktemp("stage1_text"), "clip_text")}


@pytest.fixture(scope="session")
def reduced_world() -> Path:
    """The committed reduced learned world (``experiments/world/reduced``, 32 px: the small dataset's image size;
    tests/test_world.py checks that the code rebuilds it). Read-only: a test that changes a world copies it."""
    return Path(__file__).resolve().parent.parent / "experiments" / "world" / "reduced"


@pytest.fixture(scope="session")
def open_in_chromium():
    """Loads an HTML file in real headless Chromium (tests/helpers/browser.py) and returns what it saw. Chromium
    missing or not starting fails the test with the reason (`.ci/run` installs it), never skips."""
    from tests.helpers.browser import BrowserError, check_page, chromium_binary

    def failing(call, *args):
        try:
            return call(*args), ""
        except BrowserError as exc:  # failed outside the handler: the message alone, not a chained traceback
            return None, str(exc)

    missing = failing(chromium_binary)[1]
    if missing:
        pytest.fail(missing, pytrace=False)

    def check(path: Path):
        result, error = failing(check_page, path)
        if error:
            pytest.fail(f"could not check {path} in Chromium: {error}", pytrace=False)
        return result

    return check
