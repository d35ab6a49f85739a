"""Shared fixtures: generated datasets (our format and the MindEyeV2 layout), offline environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from datamodules.synthetic import SyntheticNSDConfig, generate, simulate, write_mindeye2_layout  # noqa: E402

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
    """Tiny random CLIP image/text models saved to a local directory (32-wide targets)."""
    from lightning_modules.tiny_models import make_tiny_clip

    return make_tiny_clip(tmp_path_factory.mktemp("tiny_models"), embed_dim=32, image_size=32)


@pytest.fixture(scope="session")
def targets(small_data, tiny_models) -> Path:
    """Image and text target caches of the small synthetic dataset under ``small_data/targets``."""
    from lightning_modules.target_caching import cache_targets

    cache_targets(small_data, [1, 2, 3], small_data / "targets", image_model=str(tiny_models / "image_encoder"),
                  text_model=str(tiny_models))
    return small_data / "targets"
