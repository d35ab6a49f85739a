"""Describe a prepared dataset: counts per subject and split, normalisation, split-half reliability.

    python -m experiments.inspect_data --data data/synthetic
"""

from __future__ import annotations

import argparse
import json
import sys

from datamodules.inspection import describe_dataset
from experiments._cli import run_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.inspect_data", description=__doc__)
    parser.add_argument("--data", required=True, help="prepared dataset root")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    rows = describe_dataset(args.data)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        print("  ".join(f"{k}={v}" for k, v in row.items()))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
