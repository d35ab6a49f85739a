"""Convert a MindEyeV2 release directory into our WebDataset shard format.

    python -m experiments.prepare_nsd --mindeye2-root SRC --out DST --subjects 1 2 5 7 [--sessions N]
        [--image-size 224] [--coco-categories JSON] [--renormalise]
    python -m experiments.prepare_nsd --nsd-root NSD --out DST --subjects 1 2 [--glm ...] [--normalise ...]
        (NSD's own raw files; options: python -m experiments.prepare_nsd --nsd-root X --help)

Bounded memory, atomic and resumable (re-run the same command after an interruption). See datamodules/README.md.
"""

from __future__ import annotations

import argparse
import sys

from datamodules.mindeye2_import import import_mindeye2
from experiments._cli import run_main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.prepare_nsd", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mindeye2-root", required=True, help="MindEyeV2 release directory (holds wds/, betas_*.hdf5)")
    parser.add_argument("--out", required=True, help="output directory (one sub-directory per subject)")
    parser.add_argument("--subjects", nargs="+", required=True, help="subject numbers or names, e.g. 1 2 5 7")
    parser.add_argument("--sessions", type=int, default=None, help="import only the first N sessions (default all)")
    parser.add_argument("--image-size", type=int, default=None, help="store images at this size (<= source, 224)")
    parser.add_argument("--image-format", choices=("png", "jpg"), default="png",
                        help="png is lossless on 8-bit images (default); jpg is ~5x smaller")
    parser.add_argument("--coco-categories", default=None, help="JSON {nsd_id: [COCO super-categories]}")
    parser.add_argument("--captions", default=None, help="JSON {nsd_id: [captions]} (default SRC/coco_captions.json)")
    parser.add_argument("--renormalise", action="store_true",
                        help="recompute per-voxel z-scores from the imported sessions' training trials only")
    parser.add_argument("--roi-mask", default=None,
                        help="nsdgeneral mask path with {subject}, e.g. /nsd/{subject}/roi/nsdgeneral.nii.gz")
    parser.add_argument("--no-voxel-check", action="store_true", help="skip the expected voxel count check")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a == "--nsd-root" or a.startswith("--nsd-root=") for a in argv):  # raw NSD importer
        from experiments.prepare_nsd_raw import main as raw_main

        return raw_main(argv)
    args = build_parser().parse_args(argv)
    summary = import_mindeye2(args.mindeye2_root, args.out, args.subjects, sessions=args.sessions,
                              image_size=args.image_size, image_format=args.image_format,
                              coco_categories=args.coco_categories, captions=args.captions,
                              renormalise=args.renormalise, roi_mask_pattern=args.roi_mask,
                              check_voxel_count=not args.no_voxel_check, progress=not args.quiet)
    print(f"{'subject':8} {'voxels':>7} {'sessions':>8} {'train trials':>12} {'train images':>12} "
          f"{'test images':>11} {'test trials':>11}")
    for name, c in summary.items():
        print(f"{name:8} {c['voxels']:7d} {c['sessions']:8d} {c['train_trials']:12d} {c['train_images']:12d} "
              f"{c['test_images']:11d} {c['test_trials']:11d}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
