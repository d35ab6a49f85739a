"""Stage-2 reconstructions under four conditions, all through one trained stage 2 and one sampler setting.

- ``ceiling``: every branch conditioned on the TRUE target embeddings (``model.condition_tables`` = the target
  caches): what a perfect stage 1 would give; if it is low, the generator, not the brain, is the bottleneck.
- ``brain``: the trained pipeline (voxels -> frozen stage-1 experts -> routers).
- ``ridge``: a ridge regression's predicted embeddings (``experiments.ridge_baseline --predictions``) in place of
  the stage-1 experts: a linear decoder through the same stage 2.
- ``shuffled``: the brain row with every image conditioned on another test image's brain
  (``model.shuffle_conditions``): the chance level measured on the same data.

``predict_rows`` runs ``predict`` once per row (``<runs>/<name>/<version>_<row>/reconstructions``);
``evaluate_rows`` scores each row with the evaluation suite (PixCorr, SSIM, CLIP two-way and N-way
identification); ``rows_table`` prints them and ``rows_grid`` draws truth | row | row ... for fixed test images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from datamodules.common import atomic_path, provenance, write_json_atomic
from experiments.evaluation.inputs import load_test_images

ROWS = ("ceiling", "brain", "ridge", "shuffled")
ROW_METRICS = ("pixcorr", "ssim", "clip", "clip_top1")


@dataclass(frozen=True)
class RowSources:
    """Where the rows' fixed embeddings live: the true targets (shared by subjects) and the ridge predictions
    (one target cache per subject below each directory), per branch ``image`` / ``text``."""

    targets: dict[str, str]
    ridge: dict[str, str]


def tables_override(paths: dict[str, str]) -> str:
    """The CLI override that conditions the branches on fixed embeddings (``model.condition_tables``)."""
    return "--model.init_args.condition_tables={" + ", ".join(f"{b}: {p}" for b, p in paths.items()) + "}"


def standard_rows(sources: RowSources) -> dict[str, list[str]]:
    """{row: CLI overrides of the stage-2 config} for ``ROWS``."""
    return {"ceiling": [tables_override(sources.targets)], "brain": [], "ridge": [tables_override(sources.ridge)],
            "shuffled": ["--model.init_args.shuffle_conditions=true"]}


def predict_rows(stage2_args: list[str], checkpoint: Path, runs: Path, name: str, version: str,
                 rows: dict[str, list[str]]) -> dict[str, Path]:
    """``predict`` of the stage-2 ``checkpoint`` once per row (its CLI overrides) -> {row: reconstructions
    directory}. ``stage2_args`` are the fit's config stack and options, logging to ``runs/name`` (no version)."""
    import shutil

    from experiments.run import cli_main

    out = {}
    for row, overrides in rows.items():
        directory = runs / name / f"{version}_{row}"
        shutil.rmtree(directory, ignore_errors=True)
        cli_main(["predict", *stage2_args, f"--trainer.logger.init_args.version={version}_{row}", *overrides,
                  f"--ckpt_path={checkpoint}"])
        out[row] = directory / "reconstructions"
    return out


def evaluate_rows(data_dir: Path, recon_dirs: dict[str, Path], subjects: list[str], clip_dir: str,
                  bootstrap: int = 200, log=print, metrics: tuple[str, ...] = ROW_METRICS) -> dict[str, list]:
    """{row: [SubjectResult per subject..., mean]} with the world's CLIP as the identification network."""
    from experiments.evaluation.suite import EvaluationConfig, evaluate

    config = EvaluationConfig(weights={"clip": clip_dir}, metrics=metrics, bootstrap=bootstrap)
    return {row: evaluate(data_dir, directory, subjects, config, log=lambda *_: None)
            for row, directory in recon_dirs.items()}


def rows_table(results: dict[str, list]) -> str:
    """One table: a line per (subject, row), the mean over subjects last; chance of N-way identification."""
    first = next(iter(results.values()))
    n = first[0].num_images
    head = f"{'subject':8} {'row':9} {'PixCorr':>8} {'SSIM':>7} {'CLIP 2-way':>11} {f'CLIP top-1 of {n}':>16}"
    lines = [head, "-" * len(head)]
    for index in range(len(first)):
        for row, per_subject in results.items():
            r = per_subject[index]
            v = r.values
            lines.append(f"{r.subject:8} {row:9} {v['pixcorr']:8.3f} {v['ssim']:7.3f} {v['clip']:10.1f}% "
                         f"{v['clip_top1']:15.1f}%")
    lines.append(f"chance: CLIP 2-way 50%, CLIP top-1 {100 / n:.1f}% ({n} test images per subject)")
    return "\n".join(lines)


def rows_record(results: dict[str, list], out: Path, extra: dict | None = None) -> Path:
    """The rows' values and 95% bootstrap intervals per subject and mean as JSON, with provenance."""
    record = {row: {r.subject: {"values": r.values, "intervals": {k: list(v) for k, v in r.intervals.items()},
                                "num_images": r.num_images} for r in per_subject}
              for row, per_subject in results.items()}
    write_json_atomic(out, {"rows": record, "metrics": list(ROW_METRICS), **(extra or {}),
                            "provenance": provenance()})
    return out


def rows_grid(data_dir: Path, subject: str, recon_dirs: dict[str, Path], out: Path, num_images: int = 8,
              cell: int = 96) -> Path:
    """A PNG with a header row of labels, then one row per test image: truth | one column per row's
    reconstruction (the first ``num_images`` test images in ascending nsd_id)."""
    ids, truths = load_test_images(data_dir, subject)
    picks = np.linspace(0, len(ids) - 1, min(num_images, len(ids))).round().astype(int)
    labels = ["truth", *recon_dirs]
    header = Image.new("RGB", (cell * len(labels), 18), "white")
    draw = ImageDraw.Draw(header)
    for k, label in enumerate(labels):
        draw.text((k * cell + 4, 3), label, fill="black")
    rows = [np.asarray(header)]
    for p in picks:
        nsd_id = int(ids[p])
        images = [Image.fromarray(truths[p])]
        for directory in recon_dirs.values():
            images.append(Image.open(Path(directory) / subject / "images" / f"{nsd_id:05d}.png").convert("RGB"))
        rows.append(np.concatenate([np.asarray(i.resize((cell, cell), Image.BICUBIC)) for i in images], 1))
    with atomic_path(out) as tmp:
        Image.fromarray(np.concatenate(rows, 0)).save(tmp, format="PNG")
    return Path(out)
