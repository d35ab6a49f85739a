"""Run the benchmarks and write their JSON results (``make bench``).

    python -m experiments.bench [--only data stage1 stage2 conditions callbacks startup slurm] [--out bench_results]
                                [--work data/bench]

data:   train loader vs a bare webdataset decode loop over the same shards; peak memory vs sessions.
stage1: paper-scale encoder (V 15724, H 4096, 2-4-8-16, B 24, fp32, 2 threads) train step and eval forward vs
        the same GEMMs plus fused AdamW (the floor).
stage2: one training step on the tiny SDXL-shaped UNet (B 8, 64 px, precomputed experts, 2 threads), routed and
        regional conditioning vs stock IP-Adapter + the same LoRA; prior passes per reconstructed image.
conditions: stage-2 step with the paper's conditioning (both branches through the prior): live stage-1 encoders vs
        the conditioning cache vs the bare UNet + LoRA step on the same tokens; host memory of a rank, measured on
        the tiny configs and extrapolated to paper scale by parameter bytes (with the cache, and before it).
callbacks: the monitoring callbacks' share of fit time on the tiny stage-1 and stage-2 configs (hooks timed in
        a run with them; wall time of the same fit without them).
startup: ``python -m experiments.run --help`` in fresh processes against ``python -c "import lightning"`` (and
        torch, and the bare interpreter), medians of interleaved starts.
slurm:  (only when asked: it installs and starts a local Slurm, as root) wall time of the tiny stage-1 array round
        trip (submit -> all tasks done) vs an empty array and one task run without Slurm.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from datamodules.common import provenance, write_json_atomic
from experiments.benchmarks import data_loader, stage1_encoder, stage2_step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=("data", "stage1", "stage2", "conditions", "callbacks", "startup",
                                                  "slurm"),
                        default=["data", "stage1", "stage2", "conditions", "callbacks", "startup"],
                        help="slurm is not a default: it starts Slurm daemons (make bench includes it)")
    parser.add_argument("--out", default="bench_results", help="directory for the JSON results")
    parser.add_argument("--work", default="data/bench", help="where the benchmark data is generated (kept)")
    parser.add_argument("--samples", type=int, default=960)
    args = parser.parse_args(argv)
    results = {}
    if "data" in args.only:
        results["data_loader"] = data_loader.run(Path(args.work), num_samples=args.samples)
    if "stage1" in args.only:
        results["stage1_encoder"] = {**stage1_encoder.run(), "provenance": provenance()}
    if "stage2" in args.only:
        results["stage2_step"] = {**stage2_step.run(), "provenance": provenance()}
    if "conditions" in args.only:
        from experiments.benchmarks import condition_step, stage2_memory

        results["condition_step"] = {**condition_step.run(Path(args.work) / "conditions"), "provenance": provenance()}
        results["stage2_memory"] = {**stage2_memory.run(Path(args.work) / "conditions"), "provenance": provenance()}
    if "callbacks" in args.only:
        from experiments.benchmarks import callback_overhead

        results["callback_overhead"] = {**callback_overhead.run(Path(args.work) / "callbacks"),
                                        "provenance": provenance()}
    if "startup" in args.only:
        from experiments.benchmarks import startup

        results["startup"] = {**startup.run(), "provenance": provenance()}
    if "slurm" in args.only:
        from experiments.benchmarks.slurm_round_trip import slurm_round_trip

        results["slurm_round_trip"] = {**slurm_round_trip(Path(args.work)), "provenance": provenance()}
    for name, result in results.items():
        write_json_atomic(Path(args.out) / f"{name}.json", result)
        print(json.dumps({k: v for k, v in result.items() if k != "provenance"}, indent=2))
    return 0


if __name__ == "__main__":
    from datamodules.common import run_command

    sys.exit(run_command(main))
