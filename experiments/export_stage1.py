"""Export a stage-1 checkpoint as weights-only safetensors with the config that rebuilds it.

    python -m experiments.export_stage1 --checkpoint runs/stage1_subj01_image/version_0/checkpoints/best.ckpt \
        --out exports/stage1_subj01_image

--out gets model.safetensors (adapters, MoE, prior: the module's state dict, no optimizer state) and config.json
(hyperparameters, num_voxels, target, prior_inputs, the checkpoint's provenance with its path and sha256), written
atomically; a previous export there is replaced. Stage 2's model.image_encoder / model.text_encoder take the
directory in place of the checkpoint (lightning_modules/stage1_files.py).
"""

from __future__ import annotations

import argparse
import sys

from experiments._cli import run_main
from lightning_modules.stage1_files import WEIGHTS, export_stage1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.export_stage1", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="stage-1 Lightning checkpoint (.ckpt)")
    parser.add_argument("--out", required=True, help="export directory to write")
    args = parser.parse_args(argv)
    out = export_stage1(args.checkpoint, args.out)
    size = (out / WEIGHTS).stat().st_size
    print(f"wrote {out} ({WEIGHTS}: {size / 2**20:.1f} MiB, config.json)")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
