"""The paper's stage-2 ablation table on the learned world (nine rows, same seed and budget, bootstrap intervals).

    make demo                                   # the data, the world's targets and both stage-1 checkpoints
    python -m experiments.ablation_study --out runs/ablation_study

Every row of configs/stage2/ablations/ is fitted through the CLI on the world's stage-2 stack (same seed, epochs,
data and sampler), its test images reconstructed and scored by the evaluation suite (PixCorr, SSIM, CLIP two-way
and N-way identification with the world's CLIP); the full model is also fed shuffled brains (the chance control)
and, beside it, run on stage-1 encoders whose router keeps unit identity (``moe.scoring: unit``; fitted here with
the world's stage-1 configs, so the two routers are compared through the same stage 2).
Writes OUT/ablations.csv, ablations.json (with provenance), ablations.png, ablations_grid.png and report.md: our
table and, for every row, the direction of its difference from Text+Image (TS) beside the paper's. Finished fits
and predictions are read back, so a rerun resumes (see experiments/studies/ablations.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from datamodules.common import DataFormatError, run_command
from experiments.studies.ablations import ROWS, AblationStudy, run_ablation_study


def main(argv: list[str] | None = None) -> int:
    d = AblationStudy(Path("."), Path("."), Path("."), Path("."))
    p = argparse.ArgumentParser(prog="python -m experiments.ablation_study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/synthetic", help="the dataset (default: the demo's)")
    p.add_argument("--out", default="runs/ablation_study", help="runs and results go here")
    p.add_argument("--world", default=str(d.world), help="the learned world (its CLIP scores the rows)")
    p.add_argument("--image-encoder", default="runs/stage1_world_image/demo/checkpoints/last.ckpt",
                   help="stage-1 image-target checkpoint (default: the demo's)")
    p.add_argument("--text-encoder", default="runs/stage1_world_text/demo/checkpoints/last.ckpt",
                   help="stage-1 text-target checkpoint (default: the demo's)")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS,
                   help="ablation rows (Text+Image (TS), the reference, always runs)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="stage-2 epochs of every row")
    p.add_argument("--seed", type=int, default=d.seed, help="seed_everything of every row")
    p.add_argument("--inference-steps", type=int, default=d.inference_steps, help="sampler steps of predict")
    p.add_argument("--bootstrap", type=int, default=d.bootstrap, help="bootstrap replicates")
    p.add_argument("--subjects", nargs="+", default=d.subjects)
    p.add_argument("--no-unit-router", dest="unit_router", action="store_false",
                   help="skip the full model on unit-identity-router encoders (fitted here by default)")
    p.add_argument("--stage1-epochs", type=int, default=None,
                   help="epochs of those unit-router stage-1 fits (default: the world configs')")
    p.add_argument("--no-baselines", dest="baselines", action="store_false",
                   help="skip the dense (capacity 2) and ridge rows beside the full model")
    p.add_argument("--targets", default=None,
                   help="the world CLIP's target caches of those fits (default: DATA/targets, as make demo leaves)")
    args = p.parse_args(argv)
    data = Path(args.data)
    if not (data / "synthetic_nsd.json").is_file() and not any(data.glob("subj*")):
        raise DataFormatError(f"--data: no dataset in {data} (`make demo` or `make data` writes the default)")
    from experiments.world.validate import WorldMismatchError, check_world

    size = json.loads((data / "synthetic_nsd.json").read_text())["config"]["image_size"] \
        if (data / "synthetic_nsd.json").is_file() else None
    try:
        check_world(args.world, "--world", image_size=size)
    except WorldMismatchError as exc:
        raise DataFormatError(str(exc)) from exc
    study = AblationStudy(data, Path(args.out), Path(args.image_encoder), Path(args.text_encoder), Path(args.world),
                          tuple(args.rows), args.epochs, args.seed, args.inference_steps, args.bootstrap,
                          list(args.subjects), unit_router=args.unit_router, stage1_epochs=args.stage1_epochs,
                          targets=Path(args.targets) if args.targets else None, baselines=args.baselines)
    record = run_ablation_study(study)
    print((Path(args.out) / "report.md").read_text())
    print(f"took {record['seconds']['total']:.0f} s; wrote {args.out}/ablations.csv, ablations.json, ablations.png, "
          "ablations_grid.png, report.md")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
