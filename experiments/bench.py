"""Run the benchmarks and write their JSON results (``make bench``).

    python -m experiments.bench [--out bench_results] [--work data/bench]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from datamodules import benchmark
from datamodules.atomic import write_json_atomic


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench", description=__doc__)
    parser.add_argument("--out", default="bench_results", help="directory for the JSON results")
    parser.add_argument("--work", default="data/bench", help="where the benchmark data is generated (kept)")
    parser.add_argument("--samples", type=int, default=960)
    args = parser.parse_args(argv)
    result = benchmark.run(Path(args.work), num_samples=args.samples)
    write_json_atomic(Path(args.out) / "data_loader.json", result)
    print(json.dumps({k: v for k, v in result.items() if k != "provenance"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
