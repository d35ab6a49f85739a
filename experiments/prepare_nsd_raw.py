"""Convert subjects of NSD's own raw release into our WebDataset shard format (reached through
``python -m experiments.prepare_nsd --nsd-root ...``).

    python -m experiments.prepare_nsd --nsd-root NSD --out DST --subjects 1 2 5 7 [--glm betas_fithrf]
        [--mask FILE] [--normalise session|train] [--ncsnr-threshold 0.15] [--sessions N] [--image-size 224]

Reads betas_sessionNN.nii.gz of the chosen GLM, the nsdgeneral (or given) mask, nsd_expdesign.mat, the stimuli
HDF5 and the ROI volumes; bounded memory (one session at a time), atomic and resumable (re-run the same command
after an interruption). The recipe is documented in the README ("Raw NSD").
"""

from __future__ import annotations

import argparse
import sys

from datamodules.nsd_raw_import import DEFAULT_GLM, DESIGNS, GLMS, NORMALISATIONS, import_nsd_raw
from experiments._cli import run_main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.prepare_nsd", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nsd-root", required=True, help="NSD release directory (holds nsddata/, nsddata_betas/, "
                                                          "nsddata_stimuli/)")
    parser.add_argument("--out", required=True, help="output directory (one sub-directory per subject)")
    parser.add_argument("--subjects", nargs="+", required=True, help="subject numbers or names, e.g. 1 2 5 7")
    parser.add_argument("--glm", choices=GLMS, default=DEFAULT_GLM,
                        help=f"GLMsingle beta version (default {DEFAULT_GLM}, NSD's recommended one; MindEyeV2's "
                             "notebook read betas_fithrf)")
    parser.add_argument("--mask", default=None,
                        help="mask file (voxels > 0), may contain {subject}; default the subject's nsdgeneral")
    parser.add_argument("--normalise", choices=NORMALISATIONS, default="session",
                        help="z-score per session (default) or over the imported training trials; test "
                             "(shared) trials never enter the statistics")
    parser.add_argument("--ncsnr-threshold", type=float, default=None,
                        help="keep only mask voxels with <glm>/ncsnr.nii.gz >= this value")
    parser.add_argument("--sessions", type=int, default=None,
                        help="training shards of the first N sessions (default all present); the test set "
                             "always holds the shared trials of every session present")
    parser.add_argument("--design", choices=DESIGNS, default="expdesign",
                        help="trial order from nsd_expdesign.mat (default) or the subject's behav/responses.tsv")
    parser.add_argument("--image-size", type=int, default=None,
                        help="store images at this size (default min(224, stimulus size); resized once)")
    parser.add_argument("--image-format", choices=("png", "jpg"), default="png")
    parser.add_argument("--captions", default=None, help="JSON {nsd_id: [captions]}")
    parser.add_argument("--coco-categories", default=None, help="JSON {nsd_id: [COCO super-categories]}")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    summary = import_nsd_raw(args.nsd_root, args.out, args.subjects, glm=args.glm, mask=args.mask,
                             normalise=args.normalise, ncsnr_threshold=args.ncsnr_threshold,
                             sessions=args.sessions, design=args.design, image_size=args.image_size,
                             image_format=args.image_format,
                             captions=args.captions, coco_categories=args.coco_categories,
                             progress=not args.quiet)
    print(f"{'subject':8} {'voxels':>7} {'sessions':>8} {'train trials':>12} {'train images':>12} "
          f"{'test images':>11} {'test trials':>11}")
    for name, c in summary.items():
        print(f"{name:8} {c['voxels']:7d} {c['sessions']:8d} {c['train_trials']:12d} {c['train_images']:12d} "
              f"{c['test_images']:11d} {c['test_trials']:11d}")
    print(f"wrote {args.out} (glm {args.glm}, z-score per {args.normalise})")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
