"""Bottleneck analysis report: test retrieval and embedding metrics of stage-1 runs against ``b_size``.

    make slurm-bottleneck B_SIZES='256 512 1024 2048'          # or fit runs with --model.init_args.b_size=B
    python -m experiments.bottleneck_report --runs runs/nsd_bottleneck [more run roots] --out reports/bottleneck

Every run below --runs (a ``config.yaml`` + ``checkpoints/last.ckpt``) is tested once with its saved config if it
has no ``test_metrics.json``. Writes OUT/bottleneck.csv (mean over subjects per target and width),
OUT/bottleneck.json (every run and subject, with provenance) and OUT/bottleneck.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from experiments._cli import run_main
from experiments.studies.bottleneck import bottleneck_report, format_summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.bottleneck_report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, help="directories holding finished stage-1 runs")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    try:
        record = bottleneck_report([Path(r) for r in args.runs], Path(args.out))
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(record["summary"]))
    print(f"wrote {args.out}/bottleneck.csv, bottleneck.json, bottleneck.png")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
