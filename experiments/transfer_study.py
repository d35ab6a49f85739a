"""Cross-subject transfer on synthetic (or real) data: source, full-data, transfer and from-scratch runs.

    python -m experiments.make_synthetic_nsd --out data/transfer_study --voxels 240 240 240 --sessions 4 \
        --trials-per-session 120 --test-images 40 --image-size 32 --seed 5 --reliability 0.6 0.8
    python -m experiments.make_tiny_models --out data/tiny_models
    python -m experiments.cache_targets --data data/transfer_study --subjects 1 2 3 --text-model data/tiny_models
    python -m experiments.transfer_study --data data/transfer_study --out runs/transfer_study

On the learned world, through reconstructions (after ``make demo``: its data, the world CLIP's targets; the world's
stage-1 configs at the paper's capacity_factor 1, one stage 2 of the target's branch fitted on the source subjects):

    python -m experiments.transfer_study --data data/synthetic --out runs/studies/transfer --stage2 \
        [--target clip_image] [-- --model.init_args.moe.init_args.scoring=unit]

Runs (see ``experiments/studies/transfer.py``): source (the source subjects, all sessions), full (the new subject,
all sessions), transfer (source + fresh adapter; adapter and routers trained on --sessions sessions),
same_from_scratch (the same parts trained without the source), all_from_scratch (every part, --sessions sessions),
fine_tuned (source + fresh adapter, every part trained on --sessions sessions). Everything after ``--`` is passed to
every stage-1 run. Writes OUT/transfer_study.json (with provenance), transfer_study.csv, transfer_study.png and
report.md and prints the table; finished runs are read back, so a rerun resumes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from experiments._cli import run_main
from experiments.studies.runs import REPO, STAGE1_WORLD, STAGE2_WORLD_BRANCH
from experiments.studies.transfer import RUNS, TransferStudy, format_study, run_transfer_study


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    d = TransferStudy(Path("."), Path("."))
    p = argparse.ArgumentParser(prog="python -m experiments.transfer_study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="prepared data with the target cached under targets/")
    p.add_argument("--out", required=True, help="runs and transfer_study.json go here")
    p.add_argument("--new-subject", default=d.new_subject)
    p.add_argument("--source-subjects", nargs="+", default=d.source_subjects)
    p.add_argument("--sessions", type=int, default=d.sessions, help="the new subject's sessions for transfer")
    p.add_argument("--config", action="append", default=None,
                   help="run config stack (default: base trainer + tiny_synthetic + tiny_study)")
    p.add_argument("--target", default=d.target)
    p.add_argument("--source-epochs", type=int, default=d.source_epochs)
    p.add_argument("--full-epochs", type=int, default=d.full_epochs)
    p.add_argument("--transfer-epochs", type=int, default=d.transfer_epochs)
    p.add_argument("--transfer-lr", type=float, default=d.transfer_lr)
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS)
    p.add_argument("--stage2", action="store_true",
                   help="on the learned world: its stage-1 configs (unless --config) and reconstructions through one "
                        "stage 2 of the target's branch fitted on the source subjects")
    p.add_argument("--world", default=str(REPO / "experiments/world/default"), help="the learned world (--stage2)")
    p.add_argument("--stage2-config", action="append", default=None,
                   help="the stage-2 stack (default: the world's, the target's branch alone with both routers)")
    p.add_argument("--stage2-epochs", type=int, default=None, help="default: the stage-2 config's")
    p.add_argument("--stage2-arg", action="append", default=[], help="a CLI override of the stage-2 runs")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples of the reconstruction metrics")
    args = p.parse_args(argv)
    if not Path(args.data).is_dir():
        p.error(f"--data: no directory {args.data}")
    configs = [Path(c) for c in args.config] if args.config else d.configs
    stage2 = None
    if args.stage2:
        world = Path(args.world)
        if not (world / "image_encoder" / "config.json").is_file():
            p.error(f"--world: {world} is not a learned world (no image_encoder/config.json)")
        if args.target not in STAGE2_WORLD_BRANCH:
            p.error(f"--target: reconstructions need clip_image or clip_text, got {args.target}")
        configs = [Path(c) for c in args.config] if args.config else list(STAGE1_WORLD[args.target])
        stage2 = [Path(c) for c in args.stage2_config] if args.stage2_config else \
            list(STAGE2_WORLD_BRANCH[args.target])
        from experiments.world.validate import stage1_width_overrides

        extra = [*stage1_width_overrides(world), *extra]
    missing = [str(c) for c in [*configs, *(stage2 or [])] if not Path(c).is_file()]
    if missing:
        p.error(f"--config: {missing[0]} does not exist")
    study = TransferStudy(Path(args.data), Path(args.out), args.new_subject, args.source_subjects, args.sessions,
                          configs, args.target, args.source_epochs, args.full_epochs, args.transfer_epochs,
                          args.transfer_lr, tuple(args.runs), extra, stage2, Path(args.world), args.stage2_epochs,
                          list(args.stage2_arg), args.bootstrap)
    print(format_study(run_transfer_study(study)))
    print(f"wrote {Path(args.out)}/transfer_study.json, transfer_study.csv, transfer_study.png, report.md")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
