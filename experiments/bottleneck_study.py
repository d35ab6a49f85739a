"""The bottleneck through stage 2: stage-1 encoders and rank-matched ridge at each width, one fixed stage 2.

    python -m experiments.bottleneck_study --out runs/studies/bottleneck
    python -m experiments.bottleneck_study --out DIR --widths 1 4 16 --stage1-epochs 8 -- --trainer.accelerator=cpu

On the demo's data (``make demo`` caches the world CLIP's targets there) and the learned world: per width b (and
the unbottlenecked reference) the stage-1 encoders of the stage-2 branches (``model.b_size`` b) and reduced-rank
ridge of rank b, the brain rows once per router (the reference value router, the unit-identity router and the
dense capacity-2 baseline, side by side); one stage 2 fitted on the reference encoders reconstructs the test images from every width's
embeddings (experiments/studies/bottleneck_sweep.py). Everything after ``--`` is passed to every fit of both
stages. Writes to --out: bottleneck_study.json / .csv / .png and report.md; finished steps are reused.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from experiments.studies.bottleneck_sweep import BottleneckStudy, run_bottleneck_study
from experiments.studies.runs import ROUTERS


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    d = BottleneckStudy(Path("."))
    p = argparse.ArgumentParser(prog="python -m experiments.bottleneck_study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory of the runs and the results")
    p.add_argument("--data", default=str(d.data_dir), help="the dataset, its targets cached under targets/")
    p.add_argument("--targets", default=None, help="the world CLIP's target caches (default: DATA/targets)")
    p.add_argument("--world", default=str(d.world), help="the learned world")
    p.add_argument("--widths", type=int, nargs="+", default=list(d.widths), help="bottleneck widths b")
    p.add_argument("--subjects", nargs="+", default=d.subjects)
    p.add_argument("--scorings", nargs="+", default=list(d.scorings), choices=tuple(ROUTERS),
                   help="routers of the brain rows: value, unit (model.moe.scoring), dense (value at capacity "
                        "factor 2); stage 2 is fitted on the first one's encoders")
    p.add_argument("--config", action="append",
                   help="stage-2 config stack (default: the world's image branch alone with both routers, the "
                        "ablation row Image only (TS); its branches decide which targets get stage-1 fits)")
    p.add_argument("--stage1-epochs", type=int, default=None, help="default: the world configs'")
    p.add_argument("--stage2-epochs", type=int, default=None, help="default: the stage-2 config's")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples of the metrics' intervals")
    args = p.parse_args(argv)
    configs = [Path(c) for c in args.config] if args.config else list(d.stage2_configs)
    problems = [f"--config {c} does not exist" for c in configs if not c.is_file()]
    problems += [f"--{k} {v} is not a directory" for k, v in (("data", args.data), ("world", args.world))
                 if not Path(v).is_dir()]
    problems += [f"--widths must be at least 1, got {args.widths}"] if min(args.widths) < 1 else []
    if problems:
        print(f"error: {problems[0]}", file=sys.stderr)
        return 2
    study = BottleneckStudy(out_dir=Path(args.out), data_dir=Path(args.data),
                            targets=Path(args.targets) if args.targets else None, world=Path(args.world),
                            widths=tuple(args.widths), subjects=list(args.subjects), stage2_configs=configs,
                            scorings=tuple(dict.fromkeys(args.scorings)),
                            stage1_epochs=args.stage1_epochs, stage2_epochs=args.stage2_epochs,
                            overrides=overrides, bootstrap=args.bootstrap)
    record = run_bottleneck_study(study)
    from experiments.studies.bottleneck_sweep_report import format_table

    print(format_table(record["summary"], record["metrics"]))
    print(record["summary"]["verdict"])
    print(f"wrote {args.out}/bottleneck_study.json, .csv, .png and report.md")
    return 0


if __name__ == "__main__":
    from datamodules.common import run_command

    sys.exit(run_command(main))
