"""The demo (``make demo``): brains decoded into images on the embedded synthetic dataset and the learned world.

Steps, each skipped when its output exists: generate the synthetic dataset (our format and the MindEyeV2 layout),
import the MindEyeV2 layout with the real importer, check the learned world (``experiments/world/default``: CLIP,
VAE, SDXL-shaped UNet and IP-Adapter trained on synthetic scenes; ``make world`` rebuilds it) and cache the
stage-1 targets with its CLIP. Then stage 1: the text-target and the image-target encoders (3 subjects, the
paper's ``capacity_factor: 1``, the router that keeps unit identity; ``--routers reference`` fits the paper's
reference router instead, what ``make studies`` reads, and stops), each tested beside a ridge baseline whose test
predictions are kept. Then stage 2 on the world's SDXL with its IP-Adapter frozen (LoRA, temporal and spatial
routers of both branches), and ``predict`` of every test image under four conditions through the same sampler:
ceiling (true embeddings), brain, ridge and shuffled brain, scored with the evaluation suite and the world's CLIP.
Prints one table and writes a truth | ceiling | brain | ridge grid. Each step is also a command of its own (README).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

WORLD = "experiments/world/default"
CONFIGS = ["configs/base/trainer.yaml", "configs/stage1/tiny_synthetic.yaml", "configs/stage1/world.yaml"]
IMAGE_CONFIGS = [*CONFIGS, "configs/stage1/tiny_synthetic_image.yaml"]
# router -> (run-name suffix, overlay): the router that keeps unit identity is what the demo's stage 2 reads; the
# paper's reference router (configs/stage1/world.yaml alone) is what the studies read as their value encoders
ROUTERS = {"reference": ("", []), "unit": ("_unit", ["configs/stage1/world_unit.yaml"])}
STAGE2_CONFIGS = ["configs/base/stage2_trainer.yaml", "configs/stage2/world_synthetic.yaml"]
SUBJECTS = [1, 2, 3]


STEPS: list[tuple[str, float]] = []  # (message, start) of every step run, for the closing time summary


def step(message: str) -> float:
    print(f"\n== {message}", flush=True)
    STEPS.append((message, time.perf_counter()))
    return STEPS[-1][1]


def time_summary(end: float) -> str:
    """One line per step run: its wall time (until the next step began)."""
    ends = [start for _, start in STEPS[1:]] + [end]
    return "\n".join(f"{e - start:7.0f} s  {message}" for (message, start), e in zip(STEPS, ends))


def targets_current(directory: Path, model: Path) -> bool:
    """A target cache exists and was computed with ``model``'s present weights (a cache from another model, or
    from other weights at the same path, e.g. a rebuilt world, is redone)."""
    from datamodules.target_cache import model_fingerprint

    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        return False
    meta = json.loads(meta_path.read_text())
    return meta.get("model") == str(model.resolve()) and meta.get("model_sha256") == model_fingerprint(model)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.demo", description=__doc__)
    parser.add_argument("--data", default="data/synthetic")
    parser.add_argument("--mindeye2-layout", default="data/synthetic_mindeye2")
    parser.add_argument("--imported", default="data/synthetic_imported")
    parser.add_argument("--world", default=WORLD, help="the learned world (make world rebuilds it into data/world)")
    parser.add_argument("--runs", default="runs", help="log root; runs are <runs>/<name>/<version>")
    parser.add_argument("--version", default="demo")
    parser.add_argument("--routers", nargs="+", choices=list(ROUTERS), default=["unit"],
                        help="stage-1 routers to fit: unit (the router that keeps unit identity; stage 2 reads it) "
                             "and/or reference (the paper's; what `make studies` reads as its value encoders)")
    parser.add_argument("--stage1-only", action="store_true", help="stop after stage 1")
    args = parser.parse_args(argv)
    data, world, start = Path(args.data), Path(args.world), time.perf_counter()
    STEPS.clear()  # a second main() in one process times only its own steps

    from experiments import make_synthetic_nsd, prepare_nsd
    from experiments.world.validate import check_world

    if not (data / "synthetic_nsd.json").exists():
        step("generate the synthetic NSD dataset")
        make_synthetic_nsd.main(["--out", str(data), "--mindeye2-layout", args.mindeye2_layout])
    if not Path(args.imported, "subj03", "meta.json").exists():
        step("import its MindEyeV2 layout with the real importer")
        prepare_nsd.main(["--mindeye2-root", args.mindeye2_layout, "--out", args.imported,
                          "--subjects", *map(str, SUBJECTS), "--quiet"])
    image_size = json.loads((data / "synthetic_nsd.json").read_text())["config"]["image_size"]
    manifest = check_world(world, "--world", image_size=image_size)
    print(f"\nthe learned world: {world} ({manifest.get('preset', '?')} preset, {image_size} px; quality in "
          f"{world / 'quality.json'})")

    from experiments.caching.targets import cache_targets

    for name, kwargs, model in (("clip_text", {"text_model": str(world)}, world),
                                ("clip_image", {"image_model": str(world / "image_encoder")},
                                 world / "image_encoder")):
        if not targets_current(data / "targets" / name, model):
            step(f"cache the stage-1 {name} targets with the world's CLIP")
            cache_targets(data, SUBJECTS, data / "targets", **kwargs)

    from experiments.ridge_baseline import main as ridge_main
    from experiments.run import cli_main
    from experiments.studies import reconstruction_rows as rows

    runs = Path(args.runs)
    ridge_dir = runs / "ridge_predictions" / args.version

    def options(configs: list[str], name: str) -> tuple[list[str], Path]:
        run_dir = runs / name / args.version
        shutil.rmtree(run_dir, ignore_errors=True)
        return [*(a for c in configs for a in ("--config", c)), f"--trainer.logger.init_args.save_dir={runs}",
                f"--trainer.logger.init_args.name={name}", f"--trainer.logger.init_args.version={args.version}",
                f"--data.init_args.data_dir={data}"], run_dir

    stage1 = {}
    for router in sorted(set(args.routers)):
        suffix, extra = ROUTERS[router]
        for target, configs, name in (("clip_text", [*CONFIGS, *extra], "stage1_world_text"),
                                      ("clip_image", [*IMAGE_CONFIGS, *extra], "stage1_world_image")):
            common, run_dir = options(configs, name + suffix)
            t = step(f"fit stage 1, {target} target, {router} router (3 subjects, capacity_factor 1, CPU)")
            cli_main(["fit", *common])
            print(f"fit took {time.perf_counter() - t:.0f} s")
            step(f"test {target} ({router} router) on the shared test images, beside a ridge baseline")
            cli_main(["test", *common, f"--ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "--verbose=false"])
            ridge_main([*common[: 2 * len(configs)], "--data-dir", str(data), "--compare",
                        str(run_dir / "test_metrics.json"), "--predictions", str(ridge_dir / target)])
            stage1[target + suffix] = run_dir

    if args.stage1_only or "unit" not in args.routers:
        print(f"\nstage 1: {', '.join(str(d) for d in stage1.values())}")
        return 0
    stage2, stage2_dir = options(STAGE2_CONFIGS, "stage2_world")
    stage2 += [f"--model.init_args.sdxl_dir={world}",
               f"--model.init_args.ip_adapter_weights={world / 'ip_adapter.safetensors'}",
               f"--model.init_args.image_encoder={stage1['clip_image_unit'] / 'checkpoints' / 'last.ckpt'}",
               f"--model.init_args.text_encoder={stage1['clip_text_unit'] / 'checkpoints' / 'last.ckpt'}"]
    t = step("fit stage 2 on the world's SDXL (IP-Adapter frozen; LoRA and both branches' routers trained)")
    cli_main(["fit", *stage2])
    print(f"fit took {time.perf_counter() - t:.0f} s")

    step("reconstruct the test images: ceiling (true embeddings), brain, ridge, shuffled brain")
    sources = rows.RowSources(targets={"image": str(data / "targets" / "clip_image"),
                                       "text": str(data / "targets" / "clip_text")},
                              ridge={"image": str(ridge_dir / "clip_image"), "text": str(ridge_dir / "clip_text")})
    without_version = [a for a in stage2 if not a.startswith("--trainer.logger.init_args.version=")]
    recon = rows.predict_rows(without_version, stage2_dir / "checkpoints" / "last.ckpt", runs, "stage2_world",
                              args.version, rows.standard_rows(sources))
    step("evaluate every row (PixCorr, SSIM; CLIP two-way and N-way identification with the world's CLIP)")
    subjects = [f"subj{s:02d}" for s in SUBJECTS]
    results = rows.evaluate_rows(data, recon, subjects, str(world / "image_encoder"))
    print(rows.rows_table(results))
    record = rows.rows_record(results, stage2_dir / "reconstruction_rows.json",
                              {"reconstructions": {k: str(v) for k, v in recon.items()}})
    grid = rows.rows_grid(data, "subj01", {k: recon[k] for k in ("ceiling", "brain", "ridge")},
                          stage2_dir / "truth_vs_reconstruction.png")
    print(f"\nstage 1 (TensorBoard logs, checkpoints, config.yaml, test_metrics.json): "
          f"{', '.join(str(d) for d in stage1.values())} (stage 2 reads the _unit ones)")
    print(f"stage 2: {stage2_dir}; reconstructions and per-step routing per row: {runs / 'stage2_world'}")
    print(f"table: {record}; truth | ceiling | brain | ridge: {grid}   (make tensorboard)")
    end = time.perf_counter()
    print(f"\nwhere the time went:\n{time_summary(end)}")
    print(f"demo took {end - start:.0f} s")
    return 0


if __name__ == "__main__":
    from datamodules.common import run_command

    sys.exit(run_command(main))
