"""The paper's stage-2 ablation table on the learned world: nine rows, one fit each, same seed, data and budget.

Each row is ``configs/stage2/ablations/<row>.yaml`` on top of the world's stage-2 stack, fitted through the real
CLI (``experiments.run``) from the same seed, then ``predict`` of every test image with one sampler setting; the
full model (Text+Image (TS)) is also predicted with every image conditioned on another image's brain (the
``shuffled`` control: chance measured on the same data). Every row is scored by the evaluation suite (PixCorr,
SSIM, CLIP two-way and N-way identification with the world's CLIP) with 95% bootstrap intervals over images;
each row's difference from the full model gets a paired bootstrap interval (the suite resamples the same images
for every row of a subject) and is set beside the direction of the same difference in the paper's table.
Fits and predictions already finished are read back, so a rerun resumes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.common import DataFormatError, provenance, write_json_atomic
from experiments.evaluation.bootstrap import percentile_interval
from experiments.studies.reconstruction_rows import ROW_METRICS, evaluate_rows, predict_rows, tables_override
from experiments.studies.runs import (
    REPO,
    STAGE2_WORLD,
    cli_args,
    fit_world_encoders,
    ridge_predictions,
    run_dir,
    world_data_overrides,
)
from experiments.studies.step_inputs import inputs_digest, is_current, record_inputs, start_step

ABLATIONS = REPO / "configs/stage2/ablations"
LABELS = {"text_image_ts": "Text+Image (TS)", "text_only": "Text only", "text_only_ts": "Text only (TS)",
          "image_only": "Image only", "image_only_ts": "Image only (TS)", "text_image_s_only": "Text+Image (S only)",
          "text_image_t_fixed": "Text+Image (T fixed)", "text_image_t_hard": "Text+Image (T hard)",
          "text_image_t_soft": "Text+Image (T soft)"}
ROWS = tuple(LABELS)
FULL = "text_image_ts"
SHUFFLED = "shuffled"  # the full model, every test image conditioned on another test image's brain
# the full model on stage-1 encoders whose router keeps unit identity (``moe.scoring: unit``), fitted by the study
# with the same configs as the reference encoders: the two routers side by side through the same stage 2
UNIT_ROUTER = "unit_router"
UNIT_LABEL = "Text+Image (TS), unit router"
# the baselines beside them: the full model on dense stage-1 encoders (the reference router at capacity factor 2:
# every child takes all of its parent's units, no expert choice), fitted like the unit router's; and the full
# model's stage 2 conditioned on a ridge regression's predicted embeddings (the demo's ridge row)
DENSE_ROUTER = "dense_router"
DENSE_LABEL = "Text+Image (TS), dense (capacity 2)"
RIDGE = "ridge"
RIDGE_LABEL = "Text+Image (TS) on ridge embeddings"
EXTRA_LABELS = {UNIT_ROUTER: UNIT_LABEL, DENSE_ROUTER: DENSE_LABEL, RIDGE: RIDGE_LABEL}

# The paper's ablation table as printed (MoRE-Brain, NeurIPS 2025, arXiv 2505.15946, "Ablation Study"; copied
# from ../shared/docs/seed-paper-summary.txt): SSIM, two-way identification on AlexNet layer 2 and InceptionV3
# (fractions) and DreamSim distance, on NSD. Only the directions of differences are compared with ours.
PAPER_SOURCE = "MoRE-Brain (NeurIPS 2025, arXiv 2505.15946), ablation table (seed-paper-summary.txt)"
PAPER_HIGHER_IS_BETTER = {"ssim": True, "alexnet2": True, "inception": True, "dreamsim": False}
PAPER_LABELS = {"ssim": "SSIM", "alexnet2": "Alex(2)", "inception": "InceptionV3", "dreamsim": "DreamSim"}
PAPER_ABLATION: dict[str, dict[str, float]] = {
    "text_image_ts": {"ssim": 0.415, "alexnet2": 0.792, "inception": 0.962, "dreamsim": 0.507},
    "text_only": {"ssim": 0.410, "alexnet2": 0.748, "inception": 0.926, "dreamsim": 0.560},
    "text_only_ts": {"ssim": 0.402, "alexnet2": 0.754, "inception": 0.948, "dreamsim": 0.542},
    "image_only": {"ssim": 0.422, "alexnet2": 0.742, "inception": 0.893, "dreamsim": 0.605},
    "image_only_ts": {"ssim": 0.382, "alexnet2": 0.802, "inception": 0.957, "dreamsim": 0.528},
    "text_image_s_only": {"ssim": 0.375, "alexnet2": 0.762, "inception": 0.943, "dreamsim": 0.546},
    "text_image_t_fixed": {"ssim": 0.403, "alexnet2": 0.765, "inception": 0.940, "dreamsim": 0.533},
    "text_image_t_hard": {"ssim": 0.397, "alexnet2": 0.650, "inception": 0.867, "dreamsim": 0.626},
    "text_image_t_soft": {"ssim": 0.402, "alexnet2": 0.764, "inception": 0.941, "dreamsim": 0.543},
}
# (our metric, the paper's metric it is set beside): the same SSIM; two-way identification on a high-level
# network (ours: the world's CLIP; the paper's: InceptionV3, its highest-level two-way column)
COMPARED = (("ssim", "ssim"), ("clip", "inception"))
METRIC_LABELS = {"pixcorr": "PixCorr", "ssim": "SSIM", "clip": "CLIP 2-way", "clip_top1": "CLIP top-1"}


@dataclass
class AblationStudy:
    """data_dir: the dataset; out_dir: runs (``out_dir/runs/<row>/run``) and results; image_encoder /
    text_encoder: the stage-1 checkpoints; world: the learned world; rows: which ablation rows (the full model is
    always run: differences and the control are taken against it); epochs: stage-2 epochs per row; seed:
    ``seed_everything`` of every row; inference_steps: sampler steps (None: the config's); bootstrap: replicates;
    subjects: evaluated (and trained) subjects; configs: the stage-2 stack under the ablation file; extra: CLI
    overrides for every stage-2 run; unit_router: also run the full model on stage-1 encoders with the unit-identity
    router (fitted here, ``out_dir/stage1``, the world's stage-1 configs with ``moe.scoring: unit``);
    stage1_epochs / stage1_extra: those fits' epochs (None: the configs') and CLI overrides; targets: the world
    CLIP's target caches those fits read (default: ``data_dir/targets``, where ``make demo`` leaves them);
    baselines: also run the dense (capacity 2) and ridge rows (``DENSE_ROUTER``, ``RIDGE``)."""

    data_dir: Path
    out_dir: Path
    image_encoder: Path
    text_encoder: Path
    world: Path = REPO / "experiments/world/default"
    rows: tuple[str, ...] = ROWS
    epochs: int = 3
    seed: int = 0
    inference_steps: int | None = 10
    bootstrap: int = 1000
    subjects: list[str] = field(default_factory=lambda: ["subj01", "subj02", "subj03"])
    configs: list[Path] = field(default_factory=lambda: list(STAGE2_WORLD))
    extra: list[str] = field(default_factory=list)
    unit_router: bool = True
    stage1_epochs: int | None = None
    stage1_extra: list[str] = field(default_factory=list)
    targets: Path | None = None
    baselines: bool = True


def study_rows(rows: tuple[str, ...]) -> list[str]:
    """The rows to run in table order, the full model always among them; unknown rows are a one-line error."""
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        raise DataFormatError(f"--rows: unknown {unknown}; choose from {list(ROWS)}")
    return [r for r in ROWS if r in rows or r == FULL]


def row_args(study: AblationStudy, row: str, encoders: dict[str, Path] | None = None) -> list[str]:
    """CLI arguments of one row's fit: the stack + ``<row>.yaml`` (the unit-router row: the full model's, on
    ``encoders``), logging to ``out/runs/<row>/run``."""
    encoders = encoders or {"clip_image": study.image_encoder, "clip_text": study.text_encoder}
    config = ABLATIONS / f"{FULL if row in EXTRA_LABELS else row}.yaml"
    return [*cli_args([*study.configs, config], Path(study.out_dir) / "runs", row),
            f"--seed_everything={study.seed}", f"--trainer.max_epochs={study.epochs}",
            f"--data.init_args.data_dir={study.data_dir}",
            f"--data.init_args.subjects=[{', '.join(study.subjects)}]",
            f"--model.init_args.sdxl_dir={study.world}",
            f"--model.init_args.ip_adapter_weights={Path(study.world) / 'ip_adapter.safetensors'}",
            f"--model.init_args.image_encoder={encoders['clip_image']}",
            f"--model.init_args.text_encoder={encoders['clip_text']}",
            *([f"--model.init_args.inference_steps={study.inference_steps}"] if study.inference_steps else []),
            *study.extra]


def router_encoders(study: AblationStudy, router: str) -> dict[str, Path]:
    """{target: last.ckpt}: the stage-1 encoders of both targets with the ``ROUTERS`` entry ``router`` (``unit``:
    the unit-identity router; ``dense``: the baseline), fitted (or read back) under ``out_dir/stage1`` with the
    world's stage-1 configs, data and subjects."""
    return fit_world_encoders(Path(study.out_dir) / "stage1", study.data_dir, study.subjects, study.targets,
                              study.world, router, seed=study.seed, epochs=study.stage1_epochs,
                              extra=study.stage1_extra)


def ridge_tables(study: AblationStudy) -> str:
    """The ``condition_tables`` override of the ridge row: a ridge regression per target on the study's data, its
    test predictions per subject under ``out_dir/ridge/<target>``."""
    paths = {branch: ridge_predictions(Path(study.out_dir) / "ridge" / target, target,
                                       world_data_overrides(study.data_dir, study.subjects, study.targets, target)
                                       )["dir"] for branch, target in (("image", "clip_image"), ("text", "clip_text"))}
    return tables_override(paths)


def fit_row(args: list[str], directory: Path) -> Path:
    """Fit one row (resumed from its ``last.ckpt`` when an earlier fit of the same inputs stopped) -> its last
    checkpoint. A row whose ``fit_done.json`` exists and whose inputs (``step_inputs``) are unchanged is read
    back; one fitted from other inputs is redone."""
    from experiments.run import cli_main

    start_step(directory, args)
    last, done = directory / "checkpoints" / "last.ckpt", directory / "fit_done.json"
    if not done.is_file():
        cli_main(["fit", *args, *([f"--ckpt_path={last}"] if last.exists() else [])])
        write_json_atomic(done, {"checkpoint": str(last), "provenance": provenance()})
    return last


def predicted(directory: Path, subjects: list[str]) -> bool:
    """A finished ``predict``: every subject's ``manifest.json`` (written last) exists."""
    return all((directory / s / "manifest.json").is_file() for s in subjects)


def predict_once(args: list[str], checkpoint: Path, out: Path, name: str, row: str, overrides: list[str],
                 subjects: list[str]) -> Path:
    """``predict`` of ``checkpoint`` with ``overrides`` into ``out/name/run_<row>/reconstructions`` (returned),
    unless that holds a finished ``predict`` of the same inputs (the arguments and the checkpoint's content)."""
    directory = out / name / f"run_{row}" / "reconstructions"
    inputs = [*args, *overrides, str(checkpoint)]
    digest = inputs_digest(inputs)
    if not (predicted(directory, subjects) and is_current(directory, digest)):
        predict_rows(args, checkpoint, out, name, "run", {row: overrides})
        record_inputs(directory, digest, inputs)
    return directory


def difference(result, reference, metric: str) -> dict[str, Any]:
    """``result - reference`` on ``metric`` (mean over subjects) with its paired 95% bootstrap interval."""
    out: dict[str, Any] = {"diff": float(result.values[metric] - reference.values[metric])}
    if metric in result.replicates and metric in reference.replicates:
        out["interval"] = list(percentile_interval(result.replicates[metric] - reference.replicates[metric]))
    return out


def our_direction(diff: dict[str, Any], higher_is_better: bool = True) -> str:
    """``better`` / ``worse`` when the paired interval excludes 0 (point sign without intervals), else ``tie``."""
    low, high = diff.get("interval", (diff["diff"], diff["diff"]))
    sign = 1 if low > 0 else -1 if high < 0 else 0
    sign = sign if higher_is_better else -sign
    return {1: "better", -1: "worse", 0: "tie"}[sign]


def paper_direction(row: str, metric: str) -> str:
    """The row against the paper's full model on ``metric``: ``better`` / ``worse`` / ``same``."""
    delta = PAPER_ABLATION[row][metric] - PAPER_ABLATION[FULL][metric]
    sign = int(np.sign(delta)) * (1 if PAPER_HIGHER_IS_BETTER[metric] else -1)
    return {1: "better", -1: "worse", 0: "same"}[sign]


def agreement(paper: str, ours: str) -> str:
    """``agrees`` (same resolved direction), ``differs`` (opposite or one side tied) or ``unresolved`` (our
    interval includes 0 while the paper moved)."""
    if ours == "tie":
        return "agrees" if paper == "same" else "unresolved"
    return "agrees" if ours == paper else "differs"


def compare(results: dict[str, list]) -> dict[str, Any]:
    """Per row: its differences from the full model on every metric with intervals, the paper's and our
    directions on the compared metrics, and its CLIP two-way margin over the shuffled control."""
    full, control = results[FULL][-1], results[SHUFFLED][-1]
    rows: dict[str, Any] = {}
    for row, per_subject in results.items():
        if row == SHUFFLED:
            continue
        mean = per_subject[-1]
        entry: dict[str, Any] = {"over_shuffled_clip": difference(mean, control, "clip")}
        if row != FULL:
            entry["vs_full"] = {m: difference(mean, full, m) for m in ROW_METRICS}
        if row in PAPER_ABLATION and row != FULL:
            entry["directions"] = []
            for ours, paper in COMPARED:
                mine, theirs = our_direction(entry["vs_full"][ours]), paper_direction(row, paper)
                entry["directions"].append({"ours_metric": ours, "paper_metric": paper, "paper": theirs,
                                            "ours": mine, "agreement": agreement(theirs, mine)})
            entry["paper_worse_on"] = sum(paper_direction(row, m) == "worse" for m in PAPER_ABLATION[row])
        rows[row] = entry
    return rows


def run_ablation_study(study: AblationStudy, log=print) -> dict[str, Any]:
    """Fit, predict and evaluate every row; writes ``ablations.json`` / ``.csv`` / ``.png``, the grid and
    ``report.md`` under ``out_dir`` and returns the JSON record."""
    from experiments.studies.ablation_report import write_outputs

    start, out = time.perf_counter(), Path(study.out_dir)
    for path, option in ((study.image_encoder, "--image-encoder"), (study.text_encoder, "--text-encoder")):
        if not Path(path).is_file():
            raise DataFormatError(f"{option}: no stage-1 checkpoint {path} (`make demo` writes the default)")
    rows, recon, timing = study_rows(study.rows), {}, {}
    encoders: dict[str, dict[str, Path]] = {}
    if study.unit_router:
        t = time.perf_counter()
        log("== stage-1 encoders with the unit-identity router (moe.scoring: unit), both targets")
        encoders[UNIT_ROUTER] = router_encoders(study, "unit")
        timing["stage1 unit_router"] = time.perf_counter() - t
        rows.append(UNIT_ROUTER)
    full_conditions = {"predict": [], SHUFFLED: ["--model.init_args.shuffle_conditions=true"]}
    if study.baselines:
        t = time.perf_counter()
        log("== stage-1 encoders of the dense baseline (capacity factor 2), both targets; ridge predictions")
        encoders[DENSE_ROUTER] = router_encoders(study, "dense")
        full_conditions[RIDGE] = [ridge_tables(study)]
        timing["stage1 dense_router and ridge"] = time.perf_counter() - t
        rows.append(DENSE_ROUTER)
    for row in rows:
        t = time.perf_counter()
        args = row_args(study, row, encoders.get(row))
        log(f"== {row} ({LABELS.get(row, EXTRA_LABELS.get(row))}): fit {study.epochs} epochs, seed {study.seed}")
        checkpoint = fit_row(args, run_dir(out / "runs", row))
        timing[f"{row} fit"] = time.perf_counter() - t
        without_version = [a for a in args if not a.startswith("--trainer.logger.init_args.version=")]
        for name, overrides in (full_conditions if row == FULL else {"predict": []}).items():
            t = time.perf_counter()
            recon[row if name == "predict" else name] = predict_once(without_version, checkpoint, out / "runs", row,
                                                                     name, overrides, study.subjects)
            timing[f"{row} predict {name}"] = time.perf_counter() - t
    t = time.perf_counter()
    log("== evaluate every row with the world's CLIP")
    order = [*rows, *([RIDGE] if study.baselines else []), SHUFFLED]
    results = evaluate_rows(study.data_dir, {r: recon[r] for r in order}, study.subjects,
                            str(Path(study.world) / "image_encoder"), bootstrap=study.bootstrap)
    timing["evaluate"] = time.perf_counter() - t
    record = {"rows": {row: {r.subject: {"values": r.values, "intervals": {k: list(v) for k, v in
                                                                          r.intervals.items()},
                                         "num_images": r.num_images} for r in per_subject}
                       for row, per_subject in results.items()},
              "comparison": compare(results),
              "labels": {**LABELS, **EXTRA_LABELS, SHUFFLED: "shuffled brains (control)"},
              "metrics": list(ROW_METRICS), "paper": {"source": PAPER_SOURCE, "table": PAPER_ABLATION,
                                                      "compared": [list(c) for c in COMPARED]},
              "reconstructions": {r: str(recon[r]) for r in order},
              "study": {k: [str(x) for x in v] if isinstance(v, list) else str(v) if isinstance(v, Path) else v
                        for k, v in vars(study).items()},
              "seconds": {**timing, "total": time.perf_counter() - start}}
    record["provenance"] = provenance(data_dir=str(study.data_dir), subjects=study.subjects)
    write_outputs(record, results, out)
    return record
