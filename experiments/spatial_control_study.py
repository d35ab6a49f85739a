"""Spatial routing, a positive control: do the cells that hold the object route to the retinotopic experts?

    python -m experiments.spatial_control_study --out runs/studies/spatial_control
    python -m experiments.spatial_control_study --out DIR --predict RECON_DIR --data DATA \\
        --image-encoder IMAGE.ckpt --text-encoder TEXT.ckpt [--subjects subj01] [--permutations 1000]

Reads a stage-2 ``predict`` output (default: the demo's brain row), the synthetic dataset whose object positions
and voxel ROIs are planted, and each branch's stage-1 encoder (default: the demo's). Logic in
``experiments/studies/spatial_control*.py``. Writes to --out: spatial_control.json / .csv / .png,
spatial_control_experts.csv, report.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULTS = {"predict": "runs/stage2_world/demo_brain/reconstructions", "data": "data/synthetic",
            "image_encoder": "runs/stage1_world_image/demo/checkpoints/last.ckpt",
            "text_encoder": "runs/stage1_world_text/demo/checkpoints/last.ckpt"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.spatial_control_study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory of the results")
    p.add_argument("--predict", default=DEFAULTS["predict"], help="stage-2 predict output (<subject>/routing)")
    p.add_argument("--data", default=DEFAULTS["data"], help="the synthetic dataset (synthetic_nsd.json)")
    p.add_argument("--image-encoder", default=DEFAULTS["image_encoder"], help="stage-1 checkpoint, image branch")
    p.add_argument("--text-encoder", default=DEFAULTS["text_encoder"], help="stage-1 checkpoint, text branch")
    p.add_argument("--subjects", nargs="+", help="subjects of the predict output (default: all)")
    p.add_argument("--permutations", type=int, default=1000, help="shuffles of the object masks")
    p.add_argument("--calibration", type=int, default=200, help="random-routing draws of the false-positive rate")
    p.add_argument("--bins", type=int, default=5, help="denoising-step bins")
    p.add_argument("--planted-strength", type=float, default=0.5, help="share of a covered cell's weight planted")
    p.add_argument("--ig-steps", type=int, default=4, help="integrated-gradient steps of the voxel maps")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("permutations", "bins", "ig_steps"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}", file=sys.stderr)
            return 2
    if args.calibration < 0 or not 0 < args.planted_strength <= 1:
        bad = "--calibration must be >= 0" if args.calibration < 0 else "--planted-strength must lie in (0, 1]"
        print(f"error: {bad}", file=sys.stderr)
        return 2
    from experiments.studies.spatial_control_outputs import verdict
    from experiments.studies.spatial_control_run import SpatialStudy, run_study

    study = SpatialStudy(out_dir=Path(args.out), predict_dir=Path(args.predict), data_dir=Path(args.data),
                         encoders={"image": Path(args.image_encoder), "text": Path(args.text_encoder)},
                         subjects=args.subjects, permutations=args.permutations, calibration=args.calibration,
                         bins=args.bins, planted_strength=args.planted_strength, seed=args.seed,
                         ig_steps=args.ig_steps)
    print(verdict(run_study(study)))
    print(f"wrote {args.out}/spatial_control.json, .csv, .png, spatial_control_experts.csv, report.md")
    return 0


if __name__ == "__main__":
    from datamodules.common import run_command

    sys.exit(run_command(main))
