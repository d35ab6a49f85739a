"""The demo (``make demo``): stage 1 end to end on the embedded synthetic dataset, in one process.

Steps, each skipped when its output exists: generate the synthetic dataset (our format and the MindEyeV2 layout),
import the MindEyeV2 layout with the real importer, write tiny random CLIP models, cache the text targets; then
fit stage 1 (configs/stage1/tiny_synthetic.yaml), test it and print the result beside a ridge baseline.
Each step is also a command of its own (see README).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

CONFIGS = ["configs/base/trainer.yaml", "configs/stage1/tiny_synthetic.yaml"]


def step(message: str) -> float:
    print(f"\n== {message}", flush=True)
    return time.perf_counter()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.demo", description=__doc__)
    parser.add_argument("--data", default="data/synthetic")
    parser.add_argument("--mindeye2-layout", default="data/synthetic_mindeye2")
    parser.add_argument("--imported", default="data/synthetic_imported")
    parser.add_argument("--tiny-models", default="data/tiny_models")
    parser.add_argument("--run-dir", default="runs/stage1_tiny/demo")
    args = parser.parse_args(argv)
    data, start = Path(args.data), time.perf_counter()

    from experiments import make_synthetic_nsd, prepare_nsd

    if not (data / "synthetic_nsd.json").exists():
        step("generate the synthetic NSD dataset")
        make_synthetic_nsd.main(["--out", str(data), "--mindeye2-layout", args.mindeye2_layout])
    if not Path(args.imported, "subj03", "meta.json").exists():
        step("import its MindEyeV2 layout with the real importer")
        prepare_nsd.main(["--mindeye2-root", args.mindeye2_layout, "--out", args.imported,
                          "--subjects", "1", "2", "3", "--quiet"])

    from lightning_modules.target_caching import cache_targets
    from lightning_modules.tiny_models import make_tiny_clip

    if not Path(args.tiny_models, "text_encoder_2", "config.json").exists():
        step("write tiny random CLIP models (local directories, loaded with from_pretrained)")
        make_tiny_clip(args.tiny_models)
    if not (data / "targets" / "clip_text" / "meta.json").exists():
        step("cache the stage-1 text targets")
        cache_targets(data, [1, 2, 3], data / "targets", text_model=args.tiny_models)

    from experiments.ridge_baseline import main as ridge_main
    from experiments.run import cli_main

    run_dir = Path(args.run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    common = [a for c in CONFIGS for a in ("--config", c)]
    common += [f"--trainer.logger.init_args.save_dir={run_dir.parent.parent}",
               f"--trainer.logger.init_args.name={run_dir.parent.name}",
               f"--trainer.logger.init_args.version={run_dir.name}"]
    t = step("fit stage 1 (3 subjects, tiny models, CPU)")
    cli_main(["fit", *common])
    print(f"fit took {time.perf_counter() - t:.0f} s")
    step("test on the shared test images")
    cli_main(["test", *common, f"--ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "--verbose=false"])
    step("ridge-regression baseline on the same data")
    ridge_main([*common[: 2 * len(CONFIGS)], "--compare", str(run_dir / "test_metrics.json")])
    print(f"\nTensorBoard logs, checkpoints, config.yaml, test_metrics.json: {run_dir}  (make tensorboard)")
    print(f"demo took {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
