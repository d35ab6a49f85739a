"""Evaluate reconstructions with MindEye2's recipe (plus LPIPS and DreamSim): a table per subject and the mean.

    python -m experiments.evaluate --recons DIR --data DATA_DIR --subjects 1 [2 ...] \
        [--embeddings STAGE1_PREDICT_DIR] [--weights-config FILE | --alexnet PATH --inception PATH --clip DIR \
        --effnet PATH --swav PATH --dreamsim DIR] [--strict] [--out OUT] [--device cpu|cuda] [--batch-size N] \
        [--bootstrap 1000]

--recons: a stage-2 predict output (``DIR/<subject>/images/<nsd_id>.png``) or a folder of PNGs named by nsd_id.
--embeddings: a stage-1 predict output (``DIR/<subject>.npz``) for image and brain retrieval.
--weights-config: a JSON or YAML file mapping alexnet, inception, clip, effnet, swav, dreamsim to local paths
(relative paths are relative to the file); a command-line path overrides the file. A metric whose weights are not
given is reported as "skipped: set --<option>"; with --strict that is an error (exit status 2). Nothing downloads.
Writes OUT/metrics.csv and OUT/metrics.json (default OUT: RECONS/evaluation).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from datamodules.common import DataFormatError, debug_requested
from experiments.evaluation.inputs import EvaluationInputError
from experiments.evaluation.suite import METRICS, WEIGHT_OPTIONS, EvaluationConfig
from lightning_modules.components.target_embedders import MissingWeightsError

WEIGHT_KEYS = [k for k in WEIGHT_OPTIONS if k != "embeddings"]


def read_weights_config(path: str | Path) -> dict[str, str]:
    """``{name: path}`` from a JSON or YAML file; relative paths resolve against the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationInputError(f"--weights-config: no file {path}")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - any parse error is the same user error
        raise EvaluationInputError(f"--weights-config: cannot parse {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise EvaluationInputError(f"--weights-config: {path} must map names to paths")
    unknown = [k for k in data if k not in WEIGHT_KEYS]
    if unknown:
        raise EvaluationInputError(f"--weights-config: {path} has unknown keys {unknown} (known: {WEIGHT_KEYS})")
    return {k: str((path.parent / os.path.expanduser(str(v))) if not Path(os.path.expanduser(str(v))).is_absolute()
                   else os.path.expanduser(str(v))) for k, v in data.items() if v}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recons", required=True, help="stage-2 predict output or a folder of <nsd_id>.png")
    parser.add_argument("--data", required=True, help="prepared dataset root (test images, meta.json)")
    parser.add_argument("--subjects", nargs="+", required=True)
    parser.add_argument("--embeddings", default=None, help="stage-1 predict output directory (retrieval)")
    parser.add_argument("--weights-config", default=None, help="JSON/YAML file: network name -> local path")
    parser.add_argument("--alexnet", default=None, help="torchvision AlexNet IMAGENET1K_V1 state dict (also LPIPS)")
    parser.add_argument("--inception", default=None, help="torchvision InceptionV3 IMAGENET1K_V1 state dict")
    parser.add_argument("--clip", default=None, help="local CLIP ViT-L/14 CLIPVisionModelWithProjection directory")
    parser.add_argument("--effnet", default=None, help="torchvision EfficientNet-B1 IMAGENET1K_V2 state dict")
    parser.add_argument("--swav", default=None, help="SwAV ResNet-50 checkpoint (swav_800ep_pretrain.pth.tar)")
    parser.add_argument("--dreamsim", default=None, help="DreamSim cache directory (needs the dreamsim package)")
    parser.add_argument("--metrics", nargs="+", default=[m.key for m in METRICS],
                        help=f"subset of {[m.key for m in METRICS]} (default: all)")
    parser.add_argument("--strict", action="store_true", help="a metric that cannot run is an error (exit 2)")
    parser.add_argument("--out", default=None, help="output directory (default RECONS/evaluation)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples over images (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--antialias", action="store_true",
                        help="antialias the tensor resizes (MindEye2's evaluation did not: default off)")
    parser.add_argument("--candidates", type=int, default=300, help="retrieval candidates per draw")
    parser.add_argument("--draws", type=int, default=30, help="retrieval draws")
    parser.add_argument("--retrieval-seed", type=int, default=42, help="numpy seed of the retrieval subsets")
    parser.add_argument("--brain-key", default="clip_mean", help="brain embedding array in the stage-1 npz")
    parser.add_argument("--image-key", default="target", help="image embedding array in the stage-1 npz")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (DataFormatError, MissingWeightsError) as exc:  # bad input or weights: one line, exit status 2
        if debug_requested():
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from experiments.evaluation.report import render, write_report
    from experiments.evaluation.suite import evaluate

    weights = read_weights_config(args.weights_config) if args.weights_config else {}
    weights.update({k: getattr(args, k) for k in WEIGHT_KEYS if getattr(args, k)})
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise EvaluationInputError("--device cuda: no CUDA device is available")
    config = EvaluationConfig(weights=weights, embeddings=args.embeddings, metrics=tuple(args.metrics),
                              device=args.device, batch_size=args.batch_size, antialias=args.antialias,
                              bootstrap=args.bootstrap, seed=args.seed, candidates=args.candidates, draws=args.draws,
                              retrieval_seed=args.retrieval_seed, brain_key=args.brain_key,
                              image_key=args.image_key, strict=args.strict)
    results = evaluate(args.data, args.recons, args.subjects, config, log=lambda msg: print(msg, file=sys.stderr))
    print(render(results, config.metrics, config.bootstrap))
    inputs = {"recons": str(Path(args.recons).resolve()), "data": str(Path(args.data).resolve()),
              "subjects": [str(s) for s in args.subjects],
              "embeddings": str(Path(args.embeddings).resolve()) if args.embeddings else None}
    csv_path, json_path = write_report(args.out or Path(args.recons) / "evaluation", results, config, inputs)
    print(f"\nwrote {csv_path} and {json_path}")
    return 0


if __name__ == "__main__":
    from datamodules.common import run_command

    sys.exit(run_command(main))
