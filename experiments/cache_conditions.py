"""Compute stage 2's conditioning cache once: every trial through each branch's frozen stage-1 encoder and prior.

    python -m experiments.cache_conditions --config configs/base/stage2_trainer.yaml \
        --config configs/stage2/sdxl_nsd.yaml --out runs/conditions/subj01 [--device cuda] [CLI overrides]
    # then: python -m experiments.run fit ... --model.init_args.condition_cache="{image: DIR/image, text: DIR/text}"

The stage-2 config names the stage-1 checkpoints, the prior sampler and the data (any ``--model.init_args.X=...`` /
``--data.init_args.X=...`` override is applied as in ``experiments.run``). Sharded over tasks with ``--shard K
--num-shards N`` (default: from ``RANK``/``WORLD_SIZE`` or ``SLURM_PROCID``/``SLURM_NTASKS``); interrupted runs
resume. Layout and keys: ``lightning_modules/condition_cache.py``.
"""

from __future__ import annotations

import argparse
import json
import sys

from experiments._cli import run_main
from experiments._config import load_config
from experiments.caching.conditions import BRANCHES, cache_conditions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.cache_conditions", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", required=True, help="stage-2 run config (repeatable)")
    parser.add_argument("--out", required=True, help="cache root: one directory per branch is written below it")
    parser.add_argument("--branches", nargs="+", choices=BRANCHES, default=None, help="default: every enabled one")
    parser.add_argument("--shard", type=int, default=None, help="this task's index (default: from the launcher)")
    parser.add_argument("--num-shards", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="training trials per encoder batch "
                        "(default: data.batch_size); evaluation batches are the run's data.eval_batch_size")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-progress", action="store_true")
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if not o.startswith(("--model.", "--data."))]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (overrides are --model.* / --data.*)")
    config = json.loads(json.dumps(load_config(args.config, overrides), default=str))
    written = cache_conditions(config, args.out, args.branches, args.shard, args.num_shards, args.batch_size,
                               args.device, progress=not args.no_progress)
    for branch, parts in written.items():
        print(f"{branch}: {len(parts)} part(s) under {parts[0].parent.parent if parts else args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
