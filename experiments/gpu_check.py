"""Paper scale on one GPU, measured (``make gpu-check``): stage-1 fit and forward, SDXL-sized stage-2 training steps
at 512 and 1024 px with gradient checkpointing on and off, one 30-step generation; peak memory and times as JSON.

    python -m experiments.gpu_check [--out bench_results/gpu_check.json] [--budget-s 480]
    python -m experiments.gpu_check --device cpu --tiny --out /tmp/gpu_check.json [--models-dir data/tiny_models]

Without a CUDA GPU (and ``--device cuda``, the default) it prints one line and exits 0, writing nothing. ``--tiny``:
the same code on the tiny configs and models (seconds on CPU). What each part measures:
``experiments/benchmarks/gpu_check.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_OUT = "bench_results/gpu_check.json"
NO_GPU = "gpu-check: no CUDA GPU on this machine (torch.cuda.is_available() is False): nothing measured, nothing written"


def main(argv: list[str] | None = None) -> int:
    from datamodules.common import DataFormatError

    parser = argparse.ArgumentParser(prog="python -m experiments.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=DEFAULT_OUT, help="the JSON result (written atomically)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny configs and models (the CPU smoke run)")
    parser.add_argument("--models-dir", default=None,
                        help="--tiny: a make_tiny_models directory (default: written to a temporary directory)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="start no part after this many seconds")
    parser.add_argument("--precision", default="bf16-mixed", help="stage-1 Trainer precision")
    args = parser.parse_args(argv)
    if args.budget_s <= 0:
        raise DataFormatError(f"--budget-s must be positive, got {args.budget_s:g}")
    if args.device == "cpu" and not args.tiny:
        raise DataFormatError("--device cpu runs only with --tiny (paper scale on CPU would take hours)")
    if args.tiny and args.out == DEFAULT_OUT:
        raise DataFormatError(f"--tiny: give --out (not {DEFAULT_OUT}, which holds the GPU figures)")
    if args.models_dir and not args.tiny:
        raise DataFormatError("--models-dir is for --tiny (paper scale uses SDXL base's built-in configs)")
    if args.models_dir and not (Path(args.models_dir) / "unet" / "config.json").is_file():
        raise DataFormatError(f"--models-dir {args.models_dir}: no unet/config.json (make it with "
                              "`python -m experiments.make_tiny_models --out DIR`)")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(NO_GPU)
        return 0
    from datamodules.common import provenance, write_json_atomic
    from experiments.benchmarks.gpu_check import run

    result = run(args.device, args.tiny, args.models_dir, args.budget_s, args.precision)
    write_json_atomic(Path(args.out), {**result, "provenance": provenance()})
    failed = [name for name, part in result["parts"].items() if part["status"] != "ok"]
    print(f"gpu-check: wrote {args.out} in {result['elapsed_s']} s"
          + (f"; not ok: {', '.join(failed)}" if failed else "; every part ok"))
    return 0


if __name__ == "__main__":
    from experiments._cli import run_main

    sys.exit(run_main(main))
