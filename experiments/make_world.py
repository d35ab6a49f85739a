"""Build the learned miniature world (CLIP, VAE, SDXL-shaped UNet, IP-Adapter trained on fresh synthetic scenes).

    python -m experiments.make_world --out data/world [--preset full|reduced] [--image-size N]
    python -m experiments.make_world --out data/world --compare experiments/world/default
"""

from __future__ import annotations

import argparse
import sys

from experiments.world.validate import check_world


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.make_world", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/world")
    parser.add_argument("--preset", default="full", choices=["full", "reduced"])
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--compare", default=None, help="after building, print the max abs difference per part")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    from experiments.world.build import WorldBuildError, build_world, quality_table
    from experiments.world.compare import compare_worlds

    try:
        manifest = build_world(args.out, args.preset, args.image_size, show=not args.quiet)
        check_world(args.out, "--out")
    except (WorldBuildError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(quality_table(manifest))
    print(f"world: {args.out} ({manifest['weights_bytes'] / 1e6:.1f} MB of weights, {manifest['train_s_total']:.0f} s)")
    if args.compare:
        try:
            check_world(args.compare, "--compare")
        except (FileNotFoundError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        for part, diff in compare_worlds(args.out, args.compare).items():
            print(f"{part:12s} max abs difference {diff:.3g}")
    return 0


if __name__ == "__main__":
    from datamodules.common import run_command

    sys.exit(run_command(main))
