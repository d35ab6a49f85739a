"""Temporal router against its prior: the same stage-2 fit with the KL guidance off and at its default weight.

    python -m experiments.temporal_router_study --out runs/studies/temporal_router
    python -m experiments.temporal_router_study --out DIR --config A.yaml --config B.yaml -- --trainer.max_epochs=2

Stage 2 on the learned world (configs/stage2/world_synthetic.yaml by default, which reads the stage-1 encoders
``make demo`` trains, the reference router's), and the same fits on stage-1 encoders whose router keeps unit
identity and on dense encoders (``--scorings``; fitted here on the same data, its ``--data.init_args`` overrides
included); everything after ``--`` is passed to every stage-2 run as CLI overrides. Writes to --out:
temporal_router_study.json / .csv / .png, temporal_router_curves.csv / .npz, report.md; fitted runs are reused.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from experiments.studies.kl_guidance import TemporalStudy, run_study
from experiments.studies.runs import ROUTERS, STAGE2_WORLD


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="python -m experiments.temporal_router_study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory of the runs and the results")
    p.add_argument("--config", action="append", help="stage-2 config stack (default: the demo's)")
    p.add_argument("--kl-weights", type=float, nargs="+", help="one fit each (default: 0 and the module's default)")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples of the metrics' intervals")
    p.add_argument("--scorings", nargs="+", default=["value", "unit", "dense"],
                   choices=tuple(ROUTERS),
                   help="stage-1 routers, each with every KL weight: value, the config's encoders (the demo's); "
                        "another, encoders fitted here with the world's stage-1 configs (dense: the reference "
                        "router at capacity factor 2, a baseline)")
    p.add_argument("--targets", default=None, help="the world CLIP's target caches of those stage-1 fits "
                                                   "(default: the data's targets/, as make demo leaves them)")
    p.add_argument("--stage1-epochs", type=int, default=None, help="epochs of those fits (default: the configs')")
    args = p.parse_args(argv)
    configs = [Path(c) for c in args.config] if args.config else list(STAGE2_WORLD)
    missing = [str(c) for c in configs if not c.is_file()]
    if missing:
        print(f"error: --config {missing[0]} does not exist", file=sys.stderr)
        return 2
    if args.kl_weights and any(w < 0 for w in args.kl_weights):
        print(f"error: --kl-weights must be >= 0, got {args.kl_weights}", file=sys.stderr)
        return 2
    study = TemporalStudy(out_dir=Path(args.out), configs=configs, kl_weights=args.kl_weights,
                          overrides=overrides, bootstrap=args.bootstrap, scorings=tuple(dict.fromkeys(args.scorings)),
                          targets=Path(args.targets) if args.targets else None,
                          stage1_overrides=[f"--trainer.max_epochs={args.stage1_epochs}"] if args.stage1_epochs
                          else [])
    record = run_study(study)
    from experiments.studies.kl_guidance_outputs import verdict

    print(verdict(record))
    print(f"wrote {args.out}/temporal_router_study.json, .csv, .png, temporal_router_curves.csv, report.md")
    return 0


if __name__ == "__main__":
    from datamodules.common import run_command

    sys.exit(run_command(main))
