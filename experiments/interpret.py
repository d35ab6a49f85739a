r"""Interpretability analyses of trained checkpoints: data files, PNG figures and an HTML report per command.

    python -m experiments.interpret voxel-maps --config configs/base/trainer.yaml \
        --config configs/stage1/tiny_synthetic.yaml --ckpt runs/stage1_tiny/demo/checkpoints/last.ckpt \
        [--subject subj01] [--out DIR] [--steps 32] [--objective target] [--max-images 0] [--device cpu] \
        [--data.init_args.data_dir=...]          # any further --key=value: a config override, as for experiments.run
    python -m experiments.interpret semantic|ica|usage|all ...     (same options; `all` runs the stage-1 analyses)
    python -m experiments.interpret positive-control --out runs/positive_control [--seed 0]
    python -m experiments.interpret temporal --config <stage-2 configs> --ckpt ... [--bins 20]       (stage 2)
    python -m experiments.interpret spatial [--config <stage-2 configs> --ckpt ...] [--predict-dir DIR] \
        [--ids 3,17] [--steps 6 | --step-indices 0,10,49] [--inference-steps N] [--tile 96]      (stage 2)

Every command writes OUT/report.html (the figures and tables), OUT/provenance.json (checkpoint, resolved config,
git commit, package versions, options) and its files below OUT (default OUT: <run dir>/interpret/<command>).
Integrated gradients are computed once per OUT and reused (``attributions.npz``) while checkpoint, subject and
settings are unchanged. Bad input (missing checkpoint, unknown subject, config that does not match the checkpoint)
is one line on stderr naming the option, exit status 2.

Adding an analysis: register ``Analysis(run, help, add_arguments)`` in ``ANALYSES``; ``run(args, out_dir)`` returns
``list[ReportItem]`` and writes its files below ``out_dir``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from datamodules.common import DataFormatError
from experiments.interpretability.report import ReportItem, write_report


@dataclass(frozen=True)
class Analysis:
    """One subcommand: ``run(args, out_dir) -> items``; ``add_arguments`` adds its own options; ``in_all``: part
    of ``all`` (the stage-1 analyses)."""

    run: Callable[[argparse.Namespace, Path], list[ReportItem]]
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None] = field(default=lambda parser: None)
    in_all: bool = False


# ---------------------------------------------------------------------------------------------- shared plumbing
@lru_cache(maxsize=8)
def _resolved_config(configs: tuple[str, ...], overrides: tuple[str, ...]) -> str:
    from experiments._config import load_config

    return json.dumps(load_config(list(configs), list(overrides)), default=str)


def resolved_config(args: argparse.Namespace) -> dict:
    """The run config of ``--config`` + overrides, parsed and validated by the CLI once per process."""
    return json.loads(_resolved_config(tuple(args.config or ()), tuple(args.overrides)))


@lru_cache(maxsize=4)
def _stage1(ckpt: str, mtime: float, configs: tuple[str, ...], overrides: tuple[str, ...]):
    from experiments.interpretability.loading import load_stage1_run

    return load_stage1_run(ckpt, list(configs), list(overrides), json.loads(_resolved_config(configs, overrides)))


def stage1_context(args: argparse.Namespace):
    """(run, subject, test set, ROI info) of the stage-1 options, loaded once per process."""
    from experiments.interpretability.loading import (
        check_paths,
        check_subject,
        load_roi_info,
        load_test_set,
    )

    ckpt = check_paths(args.ckpt, args.config)
    run = _stage1(str(ckpt), ckpt.stat().st_mtime, tuple(args.config), tuple(args.overrides))
    subject = check_subject(run, args.subject)
    key = (subject, args.max_images)
    if getattr(run, "_cache", {}).get("key") != key:
        run._cache = {"key": key, "test": load_test_set(run, subject, args.max_images),
                      "roi": load_roi_info(run, subject)}
    run.model.to(args.device)
    return run, subject, run._cache["test"], run._cache["roi"]


def attributions(args: argparse.Namespace, out_dir: Path):
    """Integrated gradients of the stage-1 options, reused from ``out_dir/attributions.npz`` when its settings
    match."""
    from experiments.interpretability.attribution import Attributions, attribute_test_set
    from experiments.interpretability.outputs import write_json

    run, subject, test, _ = stage1_context(args)
    ckpt = Path(args.ckpt).resolve()
    settings = {"checkpoint": str(ckpt), "checkpoint_bytes": ckpt.stat().st_size,
                "checkpoint_mtime": ckpt.stat().st_mtime, "subject": subject, "steps": args.steps,
                "objective": args.objective, "images": len(test)}
    path, sidecar = out_dir / "attributions.npz", out_dir / "attributions.json"
    if path.is_file() and sidecar.is_file() and json.loads(sidecar.read_text()) == settings:
        return Attributions.load(path)
    if args.objective == "target" and test.target is None:
        raise DataFormatError(f"--objective target: the test batches carry no {run.target_name!r}; add it to "
                              "data.targets or use --objective backbone_sum")
    result = attribute_test_set(run.model.moe, run.model.adapters, subject, test, args.steps, args.objective,
                                args.max_rows, args.device, log=lambda m: print(m, file=sys.stderr))
    result.save(path)
    write_json(sidecar, settings)
    return result


# ---------------------------------------------------------------------------------------------- stage-1 analyses
def add_ig_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=32, help="integrated-gradients steps (midpoint rule)")
    parser.add_argument("--objective", choices=["target", "backbone_sum"], default="target",
                        help="expert objective: clip head along the image's target, or sum of the backbone head")
    parser.add_argument("--max-rows", type=int, default=4096, help="rows per integrated-gradients forward and "
                        "backward (whole images: experts + 1 copies x steps x repeats each; at least one)")
    parser.add_argument("--permutations", type=int, default=1000, help="permutation-null size (ROI agreement)")
    parser.add_argument("--components", type=int, default=8, help="ICA components")
    parser.add_argument("--score", choices=["attribution", "contribution"], default="attribution",
                        help="semantic score per expert and image")


def run_voxel_maps(args: argparse.Namespace, out_dir: Path) -> list[ReportItem]:
    from experiments.interpretability.voxel_maps import voxel_maps_analysis

    run, subject, test, roi = stage1_context(args)
    return voxel_maps_analysis(run.model.moe, run.model.adapters, subject, test, roi, attributions(args, out_dir),
                               out_dir, args.permutations, args.seed)


def run_semantic(args: argparse.Namespace, out_dir: Path) -> list[ReportItem]:
    import numpy as np

    from experiments.interpretability.attribution import contributions
    from experiments.interpretability.semantic import semantic_analysis

    run, subject, test, roi = stage1_context(args)
    moe = run.model.moe
    parents = [getattr(moe, f"parent_{level}").cpu().numpy() for level in range(moe.num_levels)]
    overall = None
    if args.score == "attribution":
        result = attributions(args, out_dir)
        scores, importance, levels, overall = result.image_sum, result.image_abs, result.levels, result.overall
    else:
        scores, levels = contributions(moe, run.model.adapters, subject, test, args.objective, args.device)
        importance = np.abs(scores)
    return semantic_analysis(scores, importance, levels, parents, test, out_dir, args.score, roi, overall)


def run_ica(args: argparse.Namespace, out_dir: Path) -> list[ReportItem]:
    from experiments.interpretability.ica import ica_analysis

    _, _, test, roi = stage1_context(args)
    return ica_analysis(attributions(args, out_dir).overall, test, roi, out_dir, args.components, args.seed)


def run_usage(args: argparse.Namespace, out_dir: Path) -> list[ReportItem]:
    from experiments.interpretability.usage import usage_analysis

    run, subject, test, _ = stage1_context(args)
    return usage_analysis(run.model.moe, run.model.adapters, subject, test, out_dir)


def run_all(args: argparse.Namespace, out_dir: Path) -> list[ReportItem]:
    items: list[ReportItem] = []
    for analysis in ANALYSES.values():
        if analysis.in_all:
            items += analysis.run(args, out_dir)
    return items


def add_positive_control_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--voxels", type=int, default=300, help="voxels of the planted subject")
    parser.add_argument("--test-images", type=int, default=50, help="shared test images of the planted subject")


def run_positive_control(args: argparse.Namespace, out_dir: Path) -> list[ReportItem]:
    """Make the planted dataset, fit stage 1 on it, then voxel maps (ROI agreement), semantic and usage."""
    from experiments.interpretability import positive_control as pc

    data = pc.make_data(out_dir / "data", pc.planted_config(args.seed, args.voxels, args.test_images))
    control = pc.fit(data, out_dir / "fit", [f"--seed_everything={args.seed}", *args.overrides])
    args.config, args.ckpt, args.overrides = control.configs, str(control.checkpoint), control.overrides
    items = [ReportItem("Positive control", f"Planted dataset {data} (datamodules.synthetic.PlantedFactorsConfig, "
                        f"seed {args.seed}): every ROI type drives one latent factor; stage 1 fitted with "
                        f"{' '.join(Path(c).name for c in control.configs)} -> {control.checkpoint}.")]
    for name in ("voxel-maps", "semantic", "usage"):
        items += ANALYSES[name].run(args, out_dir)
    return items


# ---------------------------------------------------------------------------------------------- stage-2 analyses
def stage2_run(args: argparse.Namespace, need_model: bool = True):
    """The stage-2 run of ``--config`` (+ overrides) and ``--ckpt`` (data module only without ``need_model``)."""
    from experiments.interpretability.stage2_loading import load_stage2_run

    if need_model and not args.ckpt:
        raise DataFormatError("--ckpt: give the stage-2 checkpoint to analyse")
    return load_stage2_run(args.ckpt if need_model else None, list(args.config or []), list(args.overrides),
                           args.device)


def add_temporal_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bins", type=int, default=20, help="timestep bins of the binned table")


def run_temporal(args: argparse.Namespace, out_dir: Path) -> list[ReportItem]:
    from experiments.interpretability.temporal_routing import temporal_routing

    return temporal_routing(stage2_run(args).model, out_dir, args.bins)


def add_spatial_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--predict-dir", default=None, help="a stage-2 predict output (<log_dir>/reconstructions or "
                        "its <subject> folder); without it the checkpoint reconstructs the chosen images here")
    parser.add_argument("--ids", type=lambda s: [int(i) for i in s.split(",")], default=None,
                        help="comma-separated nsd_ids (default: the first --max-images, 4 when 0)")
    parser.add_argument("--steps", type=int, default=6, help="denoising steps shown, evenly spaced")
    parser.add_argument("--step-indices", type=lambda s: [int(i) for i in s.split(",")], default=None,
                        help="comma-separated denoising step indices shown (instead of --steps)")
    parser.add_argument("--inference-steps", type=int, default=None, help="sampler steps when reconstructing "
                        "here (default: the config's)")
    parser.add_argument("--tile", type=int, default=96, help="pixel size of one overlay")


def run_spatial(args: argparse.Namespace, out_dir: Path) -> list[ReportItem]:
    from experiments.interpretability.spatial_routing import spatial_routing

    if args.predict_dir is None and not (args.config and args.ckpt):
        raise DataFormatError("--predict-dir: give a stage-2 predict output, or --config and --ckpt to reconstruct")
    run = stage2_run(args, need_model=args.predict_dir is None) if args.config else None
    return spatial_routing(out_dir, args.predict_dir, run and run.model, run and run.datamodule, args.subject,
                           args.ids, args.max_images or 4, args.step_indices or args.steps, args.tile,
                           inference_steps=args.inference_steps)


ANALYSES: dict[str, Analysis] = {
    "voxel-maps": Analysis(run_voxel_maps, "which voxels drive each expert, every level (adapter weights, IG)",
                           add_ig_arguments, in_all=True),
    "semantic": Analysis(run_semantic, "expert (and ROI) preferences per COCO super-category; expert paths",
                         add_ig_arguments, in_all=True),
    "ica": Analysis(run_ica, "FastICA of the per-image attribution maps, category loading statistics",
                    add_ig_arguments, in_all=True),
    "usage": Analysis(run_usage, "expert usage and routing entropy on the test set", add_ig_arguments,
                      in_all=True),
    "all": Analysis(run_all, "every stage-1 analysis above, integrated gradients computed once", add_ig_arguments),
    "positive-control": Analysis(run_positive_control, "planted synthetic subject: make, fit, then voxel maps, "
                                 "semantic and usage", lambda p: (add_ig_arguments(p),
                                                                  add_positive_control_arguments(p))),
    "temporal": Analysis(run_temporal, "stage 2: each branch's temporal router over all timesteps (router alone), "
                         "KL target beside", add_temporal_arguments),
    "spatial": Analysis(run_spatial, "stage 2: per-expert spatial routing maps over the denoising trajectory, "
                        "overlaid on reconstruction and ground truth", add_spatial_arguments),
}


# ---------------------------------------------------------------------------------------------- the door
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.interpret", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="analysis", required=True, metavar="analysis")
    for name, analysis in ANALYSES.items():
        p = sub.add_parser(name, help=analysis.help, description=analysis.help)
        p.add_argument("--config", action="append", default=None, help="run config(s) of the checkpoint")
        p.add_argument("--ckpt", default=None, help="trained checkpoint")
        p.add_argument("--out", default=None, help="output directory (default: <run dir>/interpret/<analysis>)")
        p.add_argument("--subject", default=None, help="subject to analyse (default: the config's first)")
        p.add_argument("--max-images", type=int, default=0, help="first N test images only (0: all)")
        p.add_argument("--device", default="cpu", help="cpu or cuda")
        p.add_argument("--seed", type=int, default=0)
        analysis.add_arguments(p)
    return parser


def default_out(args: argparse.Namespace) -> Path:
    if args.out:
        return Path(args.out)
    if args.ckpt:
        ckpt = Path(args.ckpt)
        run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
        return run_dir / "interpret" / args.analysis
    return Path("runs") / "interpret" / args.analysis


def main(argv: list[str] | None = None) -> int:
    from datamodules.common import package_versions, provenance
    from experiments.interpretability.outputs import write_json

    args, extra = build_parser().parse_known_args(argv)
    unknown = [a for a in extra if not a.startswith("--") or "." not in a.split("=")[0]]
    if unknown:
        raise DataFormatError(f"unrecognised arguments {unknown} (config overrides look like --data.init_args.x=1)")
    args.overrides = extra
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise DataFormatError("--device cuda: no CUDA device is available")
    out_dir = default_out(args)
    out_dir.mkdir(parents=True, exist_ok=True)
    items = ANALYSES[args.analysis].run(args, out_dir)
    record = provenance(analysis=args.analysis, checkpoint=str(Path(args.ckpt).resolve()) if args.ckpt else None,
                        configs=args.config, overrides=args.overrides,
                        options={k: v for k, v in vars(args).items() if k not in ("config", "overrides")},
                        resolved_config=resolved_config(args) if args.config else None,
                        analysis_package_versions=package_versions(("scikit-learn", "scipy", "nibabel")))
    write_json(out_dir / "provenance.json", record)
    report = write_report(out_dir, f"{args.analysis}: {Path(args.ckpt).name if args.ckpt else ''}", items, record)
    print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    from experiments._cli import run_main

    sys.exit(run_main(main))
