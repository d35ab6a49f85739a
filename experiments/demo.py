"""The demo (``make demo``): both stages end to end on the embedded synthetic dataset, in one process.

Steps, each skipped when its output exists: generate the synthetic dataset (our format and the MindEyeV2 layout),
import the MindEyeV2 layout with the real importer, write tiny random CLIP and SDXL-shaped models, cache the text
and image targets. Then stage 1: fit the text-target encoder (configs/stage1/tiny_synthetic.yaml), test it and print
the result beside a ridge baseline; fit the image-target encoder (+ tiny_synthetic_image.yaml). Then stage 2: fit
the routed diffusion model on subject 1 (configs/stage2/tiny_synthetic.yaml), reconstruct the test images with
``predict`` and write a ground truth | reconstruction grid PNG. Each step is also a command of its own (README).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

CONFIGS = ["configs/base/trainer.yaml", "configs/stage1/tiny_synthetic.yaml"]
IMAGE_CONFIGS = [*CONFIGS, "configs/stage1/tiny_synthetic_image.yaml"]
STAGE2_CONFIGS = ["configs/base/stage2_trainer.yaml", "configs/stage2/tiny_synthetic.yaml"]


def step(message: str) -> float:
    print(f"\n== {message}", flush=True)
    return time.perf_counter()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.demo", description=__doc__)
    parser.add_argument("--data", default="data/synthetic")
    parser.add_argument("--mindeye2-layout", default="data/synthetic_mindeye2")
    parser.add_argument("--imported", default="data/synthetic_imported")
    parser.add_argument("--tiny-models", default="data/tiny_models")
    parser.add_argument("--runs", default="runs", help="log root; runs are <runs>/<name>/<version>")
    parser.add_argument("--version", default="demo")
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
    from lightning_modules.tiny_models import make_tiny_clip, make_tiny_sdxl

    if not Path(args.tiny_models, "unet", "config.json").exists():
        step("write tiny random CLIP and SDXL-shaped models (local directories, loaded with from_pretrained)")
        make_tiny_sdxl(make_tiny_clip(args.tiny_models))
    if not (data / "targets" / "clip_text" / "meta.json").exists():
        step("cache the stage-1 text targets")
        cache_targets(data, [1, 2, 3], data / "targets", text_model=args.tiny_models)
    if not (data / "targets" / "clip_image" / "meta.json").exists():
        step("cache the stage-1 image targets")
        cache_targets(data, [1, 2, 3], data / "targets", image_model=str(Path(args.tiny_models, "image_encoder")))

    from experiments.ridge_baseline import main as ridge_main
    from experiments.run import cli_main
    from lightning_modules.reconstruction_grid import comparison_grid

    runs = Path(args.runs)

    def options(configs: list[str], name: str) -> tuple[list[str], Path]:
        run_dir = runs / name / args.version
        shutil.rmtree(run_dir, ignore_errors=True)
        return [*(a for c in configs for a in ("--config", c)), f"--trainer.logger.init_args.save_dir={runs}",
                f"--trainer.logger.init_args.name={name}", f"--trainer.logger.init_args.version={args.version}",
                f"--data.init_args.data_dir={data}"], run_dir

    common, text_dir = options(CONFIGS, "stage1_tiny")
    t = step("fit stage 1, text target (3 subjects, tiny models, CPU)")
    cli_main(["fit", *common])
    print(f"fit took {time.perf_counter() - t:.0f} s")
    step("test on the shared test images")
    cli_main(["test", *common, f"--ckpt_path={text_dir / 'checkpoints' / 'last.ckpt'}", "--verbose=false"])
    step("ridge-regression baseline on the same data")
    ridge_main([*common[: 2 * len(CONFIGS)], "--compare", str(text_dir / "test_metrics.json")])

    image_args, image_dir = options(IMAGE_CONFIGS, "stage1_tiny_image")
    t = step("fit stage 1, image target")
    cli_main(["fit", *image_args])
    print(f"fit took {time.perf_counter() - t:.0f} s")

    stage2, stage2_dir = options(STAGE2_CONFIGS, "stage2_tiny")
    stage2 += [f"--model.init_args.sdxl_dir={args.tiny_models}",
               f"--model.init_args.image_encoder={image_dir / 'checkpoints' / 'last.ckpt'}",
               f"--model.init_args.text_encoder={text_dir / 'checkpoints' / 'last.ckpt'}"]
    t = step("fit stage 2: routed diffusion on the tiny SDXL-shaped UNet (subject 1, image + text branches)")
    cli_main(["fit", *stage2])
    print(f"fit took {time.perf_counter() - t:.0f} s")
    step("reconstruct the test images of subject 1 (predict)")
    stage2[stage2.index(f"--trainer.logger.init_args.version={args.version}")] = \
        f"--trainer.logger.init_args.version={args.version}_predict"
    shutil.rmtree(runs / "stage2_tiny" / f"{args.version}_predict", ignore_errors=True)
    cli_main(["predict", *stage2, f"--ckpt_path={stage2_dir / 'checkpoints' / 'last.ckpt'}"])
    recon_dir = runs / "stage2_tiny" / f"{args.version}_predict" / "reconstructions" / "subj01"
    grid = comparison_grid(data, "subj01", recon_dir, stage2_dir / "truth_vs_reconstruction.png")
    print(f"\nstage 1 (TensorBoard logs, checkpoints, config.yaml, test_metrics.json): {text_dir}, {image_dir}")
    print(f"stage 2: {stage2_dir}; reconstructions and per-step routing: {recon_dir}")
    print(f"ground truth | reconstruction: {grid}   (make tensorboard)")
    print(f"demo took {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    from datamodules.errors import run_command

    sys.exit(run_command(main))
