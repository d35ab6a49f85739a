"""Generate the synthetic NSD-like dataset (the embedded default used by the demo, tests and CI).

    python -m experiments.make_synthetic_nsd --out data/synthetic [--seed 0] [--voxels 1200 1000 1400]
        [--mindeye2-layout data/synthetic_mindeye2] [--nsd-raw-layout data/synthetic_nsd_raw]

Deterministic by seed; writes our shard format, and optionally the same data in the MindEyeV2 release layout and
in NSD's own raw layout. NSD shows every subject the same trial order, so with ``--nsd-raw-layout`` every output
is written from the data with subjects 2.. reordered to the first subject's order (``nsd_raw_layout.nsd_like``).
"""

from __future__ import annotations

import argparse
import sys

from datamodules.synthetic import SyntheticNSDConfig, generate, simulate, write_mindeye2_layout
from experiments._cli import run_main


def build_parser() -> argparse.ArgumentParser:
    d = SyntheticNSDConfig()
    parser = argparse.ArgumentParser(prog="python -m experiments.make_synthetic_nsd", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory in our shard format")
    parser.add_argument("--mindeye2-layout", default=None, help="also write the MindEyeV2 release layout here")
    parser.add_argument("--nsd-raw-layout", default=None, help="also write NSD's own raw layout here")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--voxels", type=int, nargs="+", default=list(d.voxels), help="voxel count per subject")
    parser.add_argument("--sessions", type=int, default=d.num_sessions)
    parser.add_argument("--trials-per-session", type=int, default=d.trials_per_session)
    parser.add_argument("--test-images", type=int, default=d.num_test_images)
    parser.add_argument("--image-size", type=int, default=d.image_size)
    parser.add_argument("--reliability", type=float, nargs=2, default=list(d.reliability), metavar=("LO", "HI"),
                        help="range of the responsive voxels' split-half reliability")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = SyntheticNSDConfig(seed=args.seed, voxels=tuple(args.voxels), num_sessions=args.sessions,
                             trials_per_session=args.trials_per_session, num_test_images=args.test_images,
                             image_size=args.image_size, reliability=tuple(args.reliability))
    data = simulate(cfg)
    if args.nsd_raw_layout:
        from datamodules.nsd_raw_layout import nsd_like, write_nsd_raw_layout

        data = nsd_like(data)
        write_nsd_raw_layout(data, args.nsd_raw_layout)
        print(f"wrote NSD's raw layout to {args.nsd_raw_layout} (NSD's shared trial order)")
    generate(cfg, args.out, data)
    print(f"wrote {len(cfg.voxels)} subjects ({', '.join(cfg.subjects())}) to {args.out}")
    if args.mindeye2_layout:
        write_mindeye2_layout(data, args.mindeye2_layout)
        print(f"wrote the MindEyeV2 layout to {args.mindeye2_layout}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
