"""Write tiny random CLIP image/text models and a tiny SDXL-shaped pipeline (UNet, VAE, both text encoders,
scheduler) to a local directory (for the demo and tests; never downloaded).

    python -m experiments.make_tiny_models --out data/tiny_models [--embed-dim 32] [--image-size 32]
"""

from __future__ import annotations

import argparse
import sys

from experiments.world.tiny_models import make_tiny_clip, make_tiny_sdxl


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.make_tiny_models", description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--embed-dim", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = make_tiny_clip(args.out, embed_dim=args.embed_dim, image_size=args.image_size, seed=args.seed)
    make_tiny_sdxl(path, text_dim=args.embed_dim, seed=args.seed)
    print(f"wrote tiny models to {path} (image_encoder/, and the SDXL layout: unet/, vae/, scheduler/, "
          "text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/)")
    return 0


if __name__ == "__main__":
    from datamodules.common import run_command

    sys.exit(run_command(main))
