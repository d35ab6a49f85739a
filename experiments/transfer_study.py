"""Cross-subject transfer on synthetic (or real) data: source, full-data, transfer and from-scratch runs.

    python -m experiments.make_synthetic_nsd --out data/transfer_study --voxels 240 240 240 --sessions 4 \
        --trials-per-session 120 --test-images 40 --image-size 32 --seed 5 --reliability 0.6 0.8
    python -m experiments.make_tiny_models --out data/tiny_models
    python -m experiments.cache_targets --data data/transfer_study --subjects 1 2 3 --text-model data/tiny_models
    python -m experiments.transfer_study --data data/transfer_study --out runs/transfer_study

Runs (see ``experiments/studies/transfer.py``): source (the source subjects, all sessions), full (the new subject,
all sessions), transfer (source + fresh adapter; adapter and routers trained on --sessions sessions),
same_from_scratch (the same parts trained without the source), all_from_scratch (every part, --sessions sessions).
Writes OUT/transfer_study.json and prints the table; finished runs are read back, so a rerun resumes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from experiments._cli import run_main
from experiments.studies.transfer import RUNS, TransferStudy, format_study, run_transfer_study


def main(argv: list[str] | None = None) -> int:
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
    args = p.parse_args(argv)
    if not Path(args.data).is_dir():
        p.error(f"--data: no directory {args.data}")
    study = TransferStudy(Path(args.data), Path(args.out), args.new_subject, args.source_subjects, args.sessions,
                          [Path(c) for c in args.config] if args.config else d.configs, args.target,
                          args.source_epochs, args.full_epochs, args.transfer_epochs, args.transfer_lr,
                          tuple(args.runs))
    print(format_study(run_transfer_study(study)))
    print(f"wrote {Path(args.out) / 'transfer_study.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
