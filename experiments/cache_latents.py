"""Cache the SDXL VAE latents of every image once, for stage 2's ``model.latents_key``.

    python -m experiments.cache_latents --data data/synthetic --subjects 1 --sdxl-dir data/tiny_models \
        --out data/synthetic/targets/vae_latents [--resolution 64]

Then add ``vae_latents: targets/vae_latents`` to ``data.targets`` and set ``model.latents_key: vae_latents``.
"""

from __future__ import annotations

import argparse
import sys

from experiments._cli import run_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.cache_latents", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--subjects", nargs="+", required=True)
    parser.add_argument("--sdxl-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--resolution", type=int)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    from experiments.caching.latents import cache_latents

    path = cache_latents(args.data, args.subjects, args.out, args.sdxl_dir, args.resolution, args.batch_size,
                         args.device)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
