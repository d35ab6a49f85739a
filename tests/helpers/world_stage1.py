"""Stage 1 on the reduced learned world for the tests that decode through stage 2: the world CLIP's targets of
the small dataset, and a short stage-1 fit per target (subject 1, the prior on every expert, the demo's router that
keeps unit identity), through the CLI."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STAGE1 = [REPO / "configs/base/trainer.yaml", REPO / "configs/stage1/tiny_synthetic.yaml",
          REPO / "configs/stage1/world.yaml", REPO / "configs/stage1/world_unit.yaml"]


def cache_world_targets(world: Path, data: Path, root: Path) -> Path:
    """``root/clip_image`` and ``root/clip_text``: the world CLIP's targets of subjects 1-3 -> ``root``."""
    from experiments.caching.targets import cache_targets

    cache_targets(data, [1, 2, 3], root, image_model=str(world / "image_encoder"), text_model=str(world))
    return root


def fit_world_stage1(world: Path, data: Path, targets: Path, root: Path, epochs: int = 12) -> dict[str, Path]:
    """{target: last.ckpt} of a stage-1 fit of subject 1 per target, logged under ``root/<target>``."""
    from experiments.run import cli_main
    from experiments.world.validate import stage1_width_overrides

    out = {}
    for target in ("clip_image", "clip_text"):
        logs = root / f"world_{target}"
        cli_main(["fit", *(a for c in STAGE1 for a in ("--config", str(c))), f"--data.init_args.data_dir={data}",
                  f"--data.init_args.targets={{{target}: {targets / target}}}",
                  "--data.init_args.subjects=[subj01]", "--data.init_args.val_images=8",
                  f"--data.init_args.val_cache_dir={logs / 'val_cache'}", f"--model.init_args.target={target}",
                  *stage1_width_overrides(world),
                  f"--trainer.logger.init_args.save_dir={logs}", "--trainer.logger.init_args.version=run",
                  "--trainer.enable_progress_bar=false", f"--trainer.max_epochs={epochs}",
                  "--trainer.check_val_every_n_epoch=100"])
        out[target] = next(logs.glob("*/run/checkpoints/last.ckpt"))
    return out
