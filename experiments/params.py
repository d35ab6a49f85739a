"""Parameter counts per module and trainable share of a run config's model, built on the ``meta`` device.

    python -m experiments.params --config configs/base/trainer.yaml --config configs/stage1/image_nsd.yaml

Voxel counts come from the prepared data when it exists, else from NSD's nsdgeneral table.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from datamodules.errors import DataFormatError
from datamodules.mindeye2_import import NSD_VOXELS
from datamodules.shard_format import load_subject_meta, subject_name
from experiments._cli import run_main
from experiments._config import build, load_config
from lightning_modules.parameter_report import format_table, parameter_table


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.params", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", required=True)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    model_spec = config["model"]
    model_spec["init_args"]["num_voxels"] = voxel_counts(config["data"]["init_args"])
    model_spec["init_args"]["init_from"] = None
    model_spec["init_args"]["new_subjects"] = None
    with torch.device("meta"):
        model = build(model_spec)
    rows = parameter_table(model, args.depth)
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
