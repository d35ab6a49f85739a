"""Parameter counts per module and trainable share of a run config's model, built on the ``meta`` device.

    python -m experiments.params --config configs/base/trainer.yaml --config configs/stage1/image_nsd.yaml
    python -m experiments.params --config configs/base/stage2_trainer.yaml --config configs/stage2/sdxl_nsd.yaml
    python -m experiments.params --paper-table      # every paper-scale configuration (the README's table)

Stage 1: voxel counts come from the prepared data when it exists, else from NSD's nsdgeneral table.
Stage 2 (``RoutedDiffusionModule``): the module itself, built on ``meta`` from the config files of ``model.sdxl_dir``
(SDXL base's when absent) and the stage-1 experts' shape (``--embed-dim``, ``--experts``): nothing is loaded.
"""

from __future__ import annotations

import argparse
import json
import sys

from datamodules.common import DataFormatError
from datamodules.mindeye2_import import NSD_VOXELS
from datamodules.shard_format import load_subject_meta, subject_name
from experiments._cli import run_main
from experiments._config import load_config
from experiments.parameters.stage2 import format_report, stage2_report
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
    """Parameter rows of the ``RoutedDiffusionModule`` of a config's ``init_args``, built on ``meta``
    (``experiments.parameters.stage2``), and where its SDXL configs came from."""
    return stage2_report(init_args, embed_dim, num_experts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.params", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append")
    parser.add_argument("--paper-table", action="store_true",
                        help="every paper-scale configuration's parameters and trained share (the README's table)")
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--embed-dim", type=int, default=1280, help="stage 2: width of the stage-1 experts")
    parser.add_argument("--experts", default="2,4,8,16", help="stage 2: experts per level of the stage-1 tree")
    args = parser.parse_args(argv)
    if args.paper_table:
        from experiments.parameters.paper import paper_table

        print(paper_table())
        return 0
    if not args.config:
        parser.error("give --config (repeatable) or --paper-table")
    config = load_config(args.config)
    model_spec = config["model"]
    if str(model_spec.get("class_path", "")).endswith("RoutedDiffusionModule"):
        experts = tuple(int(e) for e in args.experts.split(","))
        rows, source = stage2_rows(model_spec["init_args"], args.embed_dim, experts)
        if args.json:
            print(json.dumps(rows, indent=1))
        else:
            print(format_report(rows))
            print(f"SDXL configs: {source}; stage-1 experts: {args.embed_dim}-d, {args.experts} per level.")
            print("The frozen stage-1 encoders (and priors) are not counted: a rank with the conditioning cache "
                  "holds none (their own report: the stage-1 configs).")
        return 0
    from experiments.parameters.paper import build_stage1_on_meta

    model = build_stage1_on_meta(config)
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
