"""Every paper-scale configuration built on the ``meta`` device: its parameters and what it trains.

``python -m experiments.params --paper-table`` prints the table the README shows (a test rebuilds it and compares);
stage 1 through the real CLI parser and ``build`` (voxel counts from NSD's nsdgeneral table when the data is absent),
stage 2 through ``experiments.parameters.stage2`` (the module itself, as a rank with the conditioning cache holds it).
"""

from __future__ import annotations

from typing import Any

import torch

STAGE1 = ["configs/base/trainer.yaml"]
STAGE2 = ["configs/base/stage2_trainer.yaml", "configs/stage2/sdxl_nsd.yaml"]
ABLATIONS = ("text_image_ts", "text_only", "text_only_ts", "image_only", "image_only_ts", "text_image_s_only",
             "text_image_t_fixed", "text_image_t_hard", "text_image_t_soft")
PAPER_CONFIGS: tuple[tuple[str, list[str]], ...] = (
    ("stage 1, image target (subj01)", [*STAGE1, "configs/stage1/image_nsd.yaml"]),
    ("stage 1, text target (subj01)", [*STAGE1, "configs/stage1/text_nsd.yaml"]),
    ("stage 1, bottleneck b 256", [*STAGE1, "configs/stage1/image_nsd.yaml", "configs/stage1/bottleneck.yaml"]),
    ("stage 1 transfer: new adapter + routers", [*STAGE1, "configs/stage1/image_nsd.yaml",
                                                 "configs/stage1/transfer/router_only.yaml"]),
    ("stage 1 transfer: MindEye2 pretraining (7 subjects)", [*STAGE1, "configs/stage1/image_nsd.yaml",
                                                             "configs/stage1/transfer/mindeye2_pretrain.yaml"]),
    ("stage 1 transfer: MindEye2 fine-tuning", [*STAGE1, "configs/stage1/image_nsd.yaml",
                                                "configs/stage1/transfer/mindeye2_finetune.yaml"]),
    ("stage 2, Text+Image (TS)", STAGE2),
    *((f"stage 2 ablation `{name}`", [*STAGE2, f"configs/stage2/ablations/{name}.yaml"]) for name in ABLATIONS),
    ("stage 2 transfer: routers only", [*STAGE2, "configs/stage2/transfer/routers_only.yaml"]),
)


def build_stage1_on_meta(config: dict[str, Any]):
    """The stage-1 module of a parsed run config on ``meta`` (``num_voxels`` from the data or NSD's table)."""
    from experiments._config import build
    from experiments.params import voxel_counts

    spec = config["model"]
    spec["init_args"]["num_voxels"] = voxel_counts(config["data"]["init_args"])
    with torch.device("meta"):
        return build(spec)  # init_from is only read when a fit starts


def config_counts(configs: list[str]) -> tuple[int, int]:
    """(parameters, trained) of the model of ``configs``, built on ``meta``."""
    from experiments._config import load_config
    from experiments.parameters.stage2 import stage2_report

    config = load_config(configs)
    if str(config["model"].get("class_path", "")).endswith("RoutedDiffusionModule"):
        total = stage2_report(config["model"]["init_args"])[0][-1]
        return total["params"], total["trainable"]
    counts = build_stage1_on_meta(config).parameter_counts()
    return counts["total"], counts["trainable"]


def paper_table() -> str:
    """The README's markdown table of every paper-scale configuration."""
    lines = ["| configuration | parameters | trained | share |", "|---|---:|---:|---:|"]
    for label, configs in PAPER_CONFIGS:
        total, trained = config_counts(configs)
        lines.append(f"| {label} | {total:,d} | {trained:,d} | {trained / total:.2%} |")
    return "\n".join(lines)
