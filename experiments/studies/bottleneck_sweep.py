"""The bottleneck through stage 2: do reconstructions use the brain, or the generative prior?

For every adapter width ``b`` (stage 1's ``b_size``: V -> b -> H inside each subject's adapter) and the
unbottlenecked reference, the stage-1 encoders of each target stage 2 reads are fitted through the real CLI (the
world's configs, the paper's ``capacity_factor: 1``) and tested; beside them the MindEye2-style linear decoder
through the same width, reduced-rank ridge of rank ``b`` (``baselines.ridge.RankedRidge``). One stage 2 is fitted
on the reference encoders and kept fixed: each width's encoders (``brain``) and ridge predictions (``ridge``) go
through it, as the demo's ridge row does, so only the information reaching the generator changes. Every row's
test reconstructions are scored by the evaluation suite (PixCorr, SSIM, CLIP two-way, N-way, CLIP cosine with
the world's CLIP), with the ceiling (true embeddings) and shuffled brains as the bounds. The brain rows come once
per router (``scorings``: the reference ``value`` router, on whose encoders stage 2 is fitted, the unit-identity
``unit`` router, decoder ``brain_unit``, and the ``dense`` baseline, the reference router at capacity factor 2,
where every child takes all of its parent's units, decoder ``brain_dense``), side by side. The paper's claim: the
MoRE-Brain reconstructions lose the most under a narrow bottleneck, while MindEye2 keeps CLIP cosine near 0.8
(leaning on its prior). Finished fits, ridge predictions and reconstructions are read back, so a rerun resumes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datamodules.common import DataFormatError, provenance, write_json_atomic
from experiments.studies.ablations import fit_row, predict_once
from experiments.studies.reconstruction_rows import evaluate_rows, tables_override
from experiments.studies.runs import (
    REPO,
    ROUTERS,
    STAGE1_WORLD,
    STAGE2_WORLD_BRANCH,
    cli_args,
    fit_and_test,
    router_overrides,
    run_dir,
)
from experiments.studies.runs import ridge_predictions as world_ridge

BRANCH_TARGET = {"image": "clip_image", "text": "clip_text"}
ENCODER_OPTION = {"image": "image_encoder", "text": "text_encoder"}
METRICS = ("pixcorr", "ssim", "clip", "clip_top1", "clip_cosine")
STAGE1_METRICS = ("fwd_top1", "bwd_top1", "cosine")


@dataclass
class BottleneckStudy:
    """out_dir: runs and results; data_dir: the dataset; targets: the world CLIP's target caches (default:
    ``data_dir/targets``, where ``make demo`` leaves them); world: the learned world; widths: the bottleneck widths (the unbottlenecked reference is always
    run); subjects: fitted and evaluated; stage2_configs: the stage-2 stack (its branches decide which targets get
    stage-1 fits); scorings: the routers of the brain rows (``ROUTERS``: ``model.moe.scoring``, ``dense`` the
    reference scoring at capacity factor 2; stage 2 is fitted
    on the first one's encoders); stage1_epochs / stage2_epochs: None keeps the configs'; overrides: CLI overrides
    of every fit of both stages; stage1_overrides / stage2_overrides: of one stage only; bootstrap: replicates of
    the intervals."""

    out_dir: Path
    data_dir: Path = REPO / "data/synthetic"
    targets: Path | None = None
    world: Path = REPO / "experiments/world/default"
    widths: tuple[int, ...] = (1, 4, 16)
    subjects: list[str] = field(default_factory=lambda: ["subj01", "subj02", "subj03"])
    stage2_configs: list[Path] = field(default_factory=lambda: list(STAGE2_WORLD_BRANCH["clip_image"]))
    scorings: tuple[str, ...] = ("value", "unit", "dense")
    stage1_epochs: int | None = None
    stage2_epochs: int | None = None
    overrides: list[str] = field(default_factory=list)
    stage1_overrides: list[str] = field(default_factory=list)
    stage2_overrides: list[str] = field(default_factory=list)
    bootstrap: int = 200

    def target_dir(self, target: str) -> Path:
        return Path(self.targets or Path(self.data_dir) / "targets").resolve() / target  # data.targets: absolute

    def all_widths(self) -> list[int | None]:
        return [*sorted(set(self.widths)), None]


def width_name(b: int | None) -> str:
    return "full" if b is None else f"b{b}"


def brain_decoder(scoring: str) -> str:
    """The decoder name of a router scoring's brain rows: ``brain`` (the reference ``value``), ``brain_<scoring>``."""
    return "brain" if scoring == "value" else f"brain_{scoring}"


def stage1_name(target: str, b: int | None, scoring: str) -> str:
    """``<target>_<width>`` for the reference router, ``<target>_<width>_<scoring>`` for another."""
    return f"{target}_{width_name(b)}" + ("" if scoring == "value" else f"_{scoring}")


def branches(study: BottleneckStudy) -> list[str]:
    """The stage-2 stack's enabled branches (``image_branch`` / ``text_branch`` not null)."""
    from experiments._config import load_config

    model = load_config([str(c) for c in study.stage2_configs], study.stage2_overrides)["model"]["init_args"]
    return [b for b in BRANCH_TARGET if model.get(f"{b}_branch") is not None]


def _data(study: BottleneckStudy, target: str | None = None) -> list[str]:
    args = [f"--data.init_args.data_dir={study.data_dir}", f"--data.init_args.subjects=[{', '.join(study.subjects)}]"]
    if target:
        args += [f"--data.init_args.targets={{{target}: {study.target_dir(target)}}}",
                 f"--model.init_args.target={target}"]
    return args


def stage1_overrides(study: BottleneckStudy, target: str, b: int | None, scoring: str = "value") -> list[str]:
    from experiments.world.validate import stage1_width_overrides

    return [*_data(study, target), f"--model.init_args.b_size={'null' if b is None else b}",
            *router_overrides(scoring),
            *stage1_width_overrides(study.world),
            *([f"--trainer.max_epochs={study.stage1_epochs}"] if study.stage1_epochs else []),
            *study.overrides, *study.stage1_overrides]


def fit_stage1(study: BottleneckStudy, target: str, b: int | None, scoring: str = "value") -> dict[str, Any]:
    """Fit and test the width-``b`` encoder of ``target`` with the router's ``scoring`` -> {"checkpoint",
    "metrics": mean test metrics}."""
    result = fit_and_test(STAGE1_WORLD[target], stage1_overrides(study, target, b, scoring),
                          Path(study.out_dir) / "stage1", stage1_name(target, b, scoring))
    metrics = result["metrics"]
    return {"checkpoint": str(Path(result["dir"]) / "checkpoints" / "last.ckpt"),
            "metrics": {m: metrics.get(f"test/{m}", _mean(metrics, m)) for m in STAGE1_METRICS}}


def _mean(metrics: dict[str, float], name: str) -> float | None:
    values = [v for k, v in metrics.items() if k.startswith("test/subj") and k.endswith(f"/{name}")]
    return sum(values) / len(values) if values else None


def ridge_predictions(study: BottleneckStudy, target: str, b: int | None) -> dict[str, Any]:
    """Rank-``b`` ridge of ``target`` on the stage-1 data -> {"dir": target caches per subject, "results"}."""
    return world_ridge(Path(study.out_dir) / "ridge" / width_name(b) / target, target,
                       stage1_overrides(study, target, b), rank=b)


def stage2_args(study: BottleneckStudy, encoders: dict[str, str]) -> list[str]:
    """The fixed stage 2's CLI arguments (logging to ``out/stage2/run``) on the reference ``encoders``."""
    return [*cli_args(study.stage2_configs, Path(study.out_dir), "stage2"), *_data(study),
            f"--model.init_args.sdxl_dir={study.world}",
            f"--model.init_args.ip_adapter_weights={Path(study.world) / 'ip_adapter.safetensors'}",
            *(f"--model.init_args.{ENCODER_OPTION[b]}={path}" for b, path in encoders.items()),
            *([f"--trainer.max_epochs={study.stage2_epochs}"] if study.stage2_epochs else []),
            *study.overrides, *study.stage2_overrides]


def conditions(study: BottleneckStudy, stage1: dict, ridge: dict, used: list[str]) -> dict[str, list[str]]:
    """{row: predict overrides}: brain and ridge per width, ceiling (true targets) and shuffled brains."""
    rows = {"ceiling": [tables_override({b: str(study.target_dir(BRANCH_TARGET[b])) for b in used})],
            "shuffled": ["--model.init_args.shuffle_conditions=true"]}
    for b in study.all_widths():
        w = width_name(b)
        for scoring in study.scorings:
            encoders = {br: stage1[stage1_name(BRANCH_TARGET[br], b, scoring)]["checkpoint"] for br in used}
            rows[f"{brain_decoder(scoring)}_{w}"] = [f"--model.init_args.{ENCODER_OPTION[br]}={path}"
                                                     for br, path in encoders.items()]
        rows[f"ridge_{w}"] = [tables_override({br: ridge[(BRANCH_TARGET[br], w)]["dir"] for br in used})]
    return rows


def run_bottleneck_study(study: BottleneckStudy, log=print) -> dict[str, Any]:
    """Fit, predict and evaluate every width; writes ``bottleneck_study.json`` / ``.csv`` / ``.png`` and
    ``report.md`` under ``out_dir`` and returns the JSON record."""
    from experiments.studies.bottleneck_sweep_report import summarise, write_outputs

    start, out = time.perf_counter(), Path(study.out_dir)
    if any(b < 1 for b in study.widths):
        raise DataFormatError(f"--widths: every width must be at least 1, got {list(study.widths)}")
    if not study.scorings or len(set(study.scorings)) != len(study.scorings) \
            or not set(study.scorings) <= set(ROUTERS):
        raise DataFormatError(f"--scorings: distinct values among {', '.join(ROUTERS)}, got {list(study.scorings)}")
    used = branches(study)
    targets = [BRANCH_TARGET[b] for b in used]
    for target in targets:
        if not (study.target_dir(target) / "meta.json").is_file():
            raise DataFormatError(f"--targets: no {target} target cache {study.target_dir(target)} "
                                  "(`make demo` caches the world CLIP's targets under the data's targets/)")
    stage1, ridge, timing = {}, {}, {}
    for b in study.all_widths():
        for target in targets:
            for scoring in study.scorings:
                t, name = time.perf_counter(), stage1_name(target, b, scoring)
                log(f"== stage 1, {target}, width {width_name(b)}, scoring {scoring}: fit, test")
                stage1[name] = fit_stage1(study, target, b, scoring)
                timing[f"stage1 {name}"] = time.perf_counter() - t
            t = time.perf_counter()
            log(f"== rank-matched ridge, {target}, width {width_name(b)}")
            ridge[(target, width_name(b))] = ridge_predictions(study, target, b)
            timing[f"ridge {target} {width_name(b)}"] = time.perf_counter() - t
    t = time.perf_counter()
    log(f"== stage 2 on the unbottlenecked encoders of the {study.scorings[0]} router (kept fixed for every row)")
    args = stage2_args(study, {b: stage1[stage1_name(BRANCH_TARGET[b], None, study.scorings[0])]["checkpoint"]
                               for b in used})
    checkpoint = fit_row(args, run_dir(out, "stage2"))
    timing["stage2 fit"] = time.perf_counter() - t
    recon = {}
    without_version = [a for a in args if not a.startswith("--trainer.logger.init_args.version=")]
    for row, overrides in conditions(study, stage1, ridge, used).items():
        t = time.perf_counter()
        log(f"== predict {row}")
        recon[row] = predict_once(without_version, checkpoint, out, "stage2", row, overrides, study.subjects)
        timing[f"predict {row}"] = time.perf_counter() - t
    t = time.perf_counter()
    log("== evaluate every row with the world's CLIP")
    results = evaluate_rows(Path(study.data_dir), recon, study.subjects, str(Path(study.world) / "image_encoder"),
                            bootstrap=study.bootstrap, metrics=METRICS)
    timing["evaluate"] = time.perf_counter() - t
    record: dict[str, Any] = {
        "widths": [width_name(b) for b in study.all_widths()], "branches": used, "metrics": list(METRICS),
        "targets": targets, "decoders": [*(brain_decoder(s) for s in study.scorings), "ridge"],
        "rows": {row: {r.subject: {"values": r.values, "intervals": {k: list(v) for k, v in r.intervals.items()},
                                   "num_images": r.num_images} for r in per_subject}
                 for row, per_subject in results.items()},
        "stage1": stage1,
        "ridge": {f"{t}_{w}": v for (t, w), v in ridge.items()},
        "reconstructions": {r: str(d) for r, d in recon.items()},
        "study": {k: [str(x) for x in v] if isinstance(v, list) else str(v) if isinstance(v, Path) else v
                  for k, v in vars(study).items()},
        "seconds": {**timing, "total": time.perf_counter() - start},
        "provenance": provenance(data_dir=str(study.data_dir), subjects=study.subjects)}
    record["summary"] = summarise(record)
    write_outputs(record, results, out)
    write_json_atomic(out / "bottleneck_study.json", record)
    return record
