"""The interpretability positive control: a synthetic subject whose ROI types each drive one separable latent
factor (``datamodules.synthetic.PlantedFactorsConfig``), a target that is a linear image of the same factors, and
a short seeded stage-1 fit (``configs/stage1/interpret_positive_control.yaml``) through the real CLI. The voxel-
expert maps of that fit should agree with the planted ROIs far above a permutation null, and each category-
selective ROI should rank first for its category.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from datamodules.synthetic import PlantedFactorsConfig, generate, simulate, write_planted_targets

REPO = Path(__file__).resolve().parents[2]
CONFIGS = [str(REPO / "configs/base/trainer.yaml"), str(REPO / "configs/stage1/tiny_synthetic.yaml"),
           str(REPO / "configs/stage1/interpret_positive_control.yaml")]
TARGET = "factors"


@dataclass
class PositiveControl:
    """A fitted positive control: its data, config files, CLI overrides and checkpoint."""

    data_dir: Path
    configs: list[str]
    overrides: list[str]
    checkpoint: Path


def planted_config(seed: int = 0, voxels: int = 300, test_images: int = 50) -> PlantedFactorsConfig:
    """One small subject: 4 sessions of 120 trials, ``test_images`` shared test images x 3 repeats, the rest
    training images (110 with the defaults, 10 of them held out for validation)."""
    return PlantedFactorsConfig(seed=seed, voxels=(voxels,), num_sessions=4, trials_per_session=120,
                                num_test_images=test_images, image_size=16)


def make_data(root: str | Path, cfg: PlantedFactorsConfig) -> Path:
    """Write the planted dataset and its target cache (``targets/factors``) below ``root``; returns ``root``."""
    root = Path(root)
    if not (root / "synthetic_nsd.json").is_file():
        data = generate(cfg, root, simulate(cfg))
        write_planted_targets(data, root / "targets" / TARGET)
    return root


def fit(data_dir: Path, logs: Path, overrides: list[str] | None = None) -> PositiveControl:
    """Fit stage 1 on the planted data with the positive-control config (seeded); returns the run."""
    from experiments.run import cli_main
    from experiments.studies.runs import cli_args

    logs = Path(logs)
    common = [f"--data.init_args.data_dir={data_dir}", f"--data.init_args.val_cache_dir={logs / 'val_cache'}"]
    args = ["fit", *cli_args(CONFIGS, logs), *common, "--trainer.enable_model_summary=false", *(overrides or [])]
    checkpoint = logs / "stage1_positive_control" / "run" / "checkpoints" / "last.ckpt"
    if not checkpoint.is_file():
        cli_main(args)
    return PositiveControl(Path(data_dir), list(CONFIGS), common + list(overrides or []), checkpoint)
