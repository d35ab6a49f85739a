"""Parameter counts per module and trainable share of a run config's model, built on the ``meta`` device.

    python -m experiments.params --config configs/base/trainer.yaml --config configs/stage1/image_nsd.yaml
    python -m experiments.params --config configs/base/stage2_trainer.yaml --config configs/stage2/sdxl_nsd.yaml

Stage 1: voxel counts come from the prepared data when it exists, else from NSD's nsdgeneral table.
Stage 2 (``RoutedDiffusionModule``): the module is not built (it loads from disk); its trained and frozen parts are
assembled from ``model.init_args`` with the UNet of ``<sdxl_dir>/unet/config.json`` (SDXL base's when absent).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from datamodules.common import DataFormatError
from datamodules.mindeye2_import import NSD_VOXELS
from datamodules.shard_format import load_subject_meta, subject_name
from experiments._cli import run_main
from experiments._config import build, load_config
from experiments.parameters.stage2 import SDXL_BASE_UNET, format_report, stage2_parameter_report
from experiments.parameters.table import format_table, parameter_table


def voxel_counts(data_args: dict) -> dict[str, int]:
    counts = {}
    for s in data_args.get("subjects") or ["subj01"]:
        name = subject_name(s)
        try:
            counts[name] = int(load_subject_meta(data_args["data_dir"], name)["num_voxels"])
        except DataFormatError:
            if name not in NSD_VOXELS:
                raise
            counts[name] = NSD_VOXELS[name]
    return counts


def stage2_rows(init_args: dict, embed_dim: int = 1280, num_experts: tuple[int, ...] = (2, 4, 8, 16)
                ) -> tuple[list[dict], str]:
    """Parameter rows of a ``RoutedDiffusionModule`` config (its ``init_args``) and where its UNet config came
    from."""
    from lightning_modules.components.routed_branch import BranchSpec

    branches = {b: BranchSpec(**init_args[f"{b}_branch"]) if init_args.get(f"{b}_branch") else None
                for b in ("image", "text")}
    unet_json = Path(str(init_args.get("sdxl_dir") or "")) / "unet" / "config.json"
    if init_args.get("sdxl_dir") and unet_json.is_file():
        unet_config, source = json.loads(unet_json.read_text()), str(unet_json)
    else:
        unet_config, source = SDXL_BASE_UNET, "SDXL base (built in; no <sdxl_dir>/unet/config.json here)"
    weights, trainable = init_args.get("ip_adapter_weights"), init_args.get("ip_adapter_trainable")
    rows = stage2_parameter_report(
        unet_config, branches["image"], branches["text"], embed_dim, num_experts,
        ip_tokens=init_args.get("ip_tokens", 4),
        lora_rank=init_args.get("lora_rank", 16), lora_alpha=init_args.get("lora_alpha", 16),
        lora_targets=init_args.get("lora_targets"),
        ip_adapter_loaded=bool(weights), ip_adapter_trainable=trainable,
        prompt_mode=init_args.get("prompt_mode", "reference"), pooled_text=init_args.get("pooled_text", "zeros"),
        trainable=init_args.get("trainable"))
    return rows, source


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.params", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", required=True)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--embed-dim", type=int, default=1280, help="stage 2: width of the stage-1 experts")
    parser.add_argument("--experts", default="2,4,8,16", help="stage 2: experts per level of the stage-1 tree")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    model_spec = config["model"]
    if str(model_spec.get("class_path", "")).endswith("RoutedDiffusionModule"):
        experts = tuple(int(e) for e in args.experts.split(","))
        rows, source = stage2_rows(model_spec["init_args"], args.embed_dim, experts)
        if args.json:
            print(json.dumps(rows, indent=1))
        else:
            print(format_report(rows))
            print(f"UNet config: {source}; stage-1 experts: {args.embed_dim}-d, {args.experts} per level.")
            print("The frozen stage-1 encoders (and priors) come from their checkpoints and are not counted.")
        return 0
    model_spec["init_args"]["num_voxels"] = voxel_counts(config["data"]["init_args"])
    with torch.device("meta"):
        model = build(model_spec)  # init_from is only read when a fit starts
    rows = parameter_table(model, args.depth)
    counts = model.parameter_counts()
    if args.json:
        print(json.dumps({"modules": rows, "groups": counts}, indent=1))
        return 0
    print(format_table(rows))
    print("\n" + "\n".join(f"{name:13} {g['params']:14,d} {g['share']:7.2%} trained {g['trainable']:14,d}"
                           for name, g in counts["groups"].items()))
    print(f"trained: {counts['trainable']:,} of {counts['total']:,} ({counts['trainable_share']:.2%}); parts: "
          f"{', '.join(counts['trainable_parts'])}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
