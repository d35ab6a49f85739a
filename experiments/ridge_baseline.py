"""Ridge-regression baseline on a run config's data and target, printed beside a stage-1 test result.

    python -m experiments.ridge_baseline --config configs/base/trainer.yaml --config configs/stage1/tiny_synthetic.yaml \
        [--compare runs/stage1_tiny/demo/test_metrics.json] [--out ridge.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from datamodules.common import provenance, write_json_atomic
from experiments._cli import run_main
from experiments._config import build, load_config
from experiments.baselines.ridge import ridge_baseline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.ridge_baseline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", required=True, help="run config(s), as for experiments.run")
    parser.add_argument("--compare", default=None, help="a stage-1 test_metrics.json to print beside")
    parser.add_argument("--data-dir", default=None, help="the dataset (default: the config's data.init_args.data_dir)")
    parser.add_argument("--out", default=None, help="write the baseline's results here (JSON)")
    parser.add_argument("--predictions", default=None,
                        help="write the predicted test embeddings here, a target cache per subject (DIR/subjXX), "
                             "for stage 2's model.condition_tables")
    parser.add_argument("--rank", type=int, default=None,
                        help="reduced-rank ridge: the linear decoder through a width-RANK bottleneck (default: full)")
    args = parser.parse_args(argv)
    if args.rank is not None and args.rank < 1:
        parser.error(f"--rank: must be at least 1, got {args.rank}")
    config = load_config(args.config, [f"--data.init_args.data_dir={args.data_dir}"] if args.data_dir else None)
    dm = build(config["data"])
    model_args = config["model"]["init_args"]
    target = model_args.get("target", "clip_image")
    results = ridge_baseline(dm, target, model_args.get("retrieval_candidates", 300),
                             model_args.get("retrieval_draws", 30), predictions_dir=args.predictions,
                             rank=args.rank)
    if args.out:
        write_json_atomic(args.out, {"ridge": results, "target": target, "rank": args.rank,
                                     "provenance": provenance()})
    ours = json.loads(Path(args.compare).read_text())["metrics"] if args.compare else {}
    print(f"test retrieval top-1 ({target}; chance = 1 / candidates)")
    print(f"{'subject':8} {'candidates':>10} {'chance':>7} {'MoE fwd':>8} {'MoE bwd':>8} {'ridge fwd':>9} "
          f"{'ridge bwd':>9} {'ridge alpha':>11}")
    for subject, r in results.items():
        moe_fwd = ours.get(f"test/{subject}/fwd_top1", float("nan"))
        moe_bwd = ours.get(f"test/{subject}/bwd_top1", float("nan"))
        print(f"{subject:8} {r['candidates']:10d} {1 / r['candidates']:7.3f} {moe_fwd:8.3f} {moe_bwd:8.3f} "
              f"{r['fwd_top1']:9.3f} {r['bwd_top1']:9.3f} {r['alpha']:11.0e}")
    if ours:
        mean = sum(r["fwd_top1"] for r in results.values()) / len(results)
        print(f"{'mean':8} {'':10} {'':7} {ours.get('test/fwd_top1', float('nan')):8.3f} {'':8} {mean:9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
