"""Compute stage-1 target embeddings once per image into target caches joined by the DataModule.

    python -m experiments.cache_targets --data DIR --subjects 1 2 --image-model CLIP_DIR --text-model SDXL_DIR \
        [--out DIR/targets] [--device cuda]

--image-model: a CLIP vision-with-projection directory (ViT-bigG/14 at paper scale) with preprocessor_config.json.
--text-model: an SDXL base directory (text_encoder_2/, tokenizer_2/). Local directories only: nothing downloads.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from experiments._cli import run_main
from experiments.caching.targets import cache_targets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.cache_targets", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="prepared dataset root")
    parser.add_argument("--subjects", nargs="+", required=True)
    parser.add_argument("--image-model", default=None, help="local CLIP vision model directory")
    parser.add_argument("--text-model", default=None, help="local SDXL directory (text_encoder_2, tokenizer_2)")
    parser.add_argument("--image-tokens", action="store_true",
                        help="also cache the image model's patch tokens (MindEye2's 256 x 1664 target)")
    parser.add_argument("--out", default=None, help="cache root (default DATA/targets)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if not (args.image_model or args.text_model):
        parser.error("give --image-model and/or --text-model")
    written = cache_targets(args.data, args.subjects, args.out or Path(args.data) / "targets",
                            image_model=args.image_model, text_model=args.text_model, image_tokens=args.image_tokens,
                            batch_size=args.batch_size, device=args.device)
    for name, path in written.items():
        print(f"wrote {name} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
