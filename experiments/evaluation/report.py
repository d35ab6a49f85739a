"""The result table: one row per subject plus the mean over subjects, bootstrap 95% intervals, and the published
anchor numbers (reference-nsd-eval.md 4.8) beside ours; printed, and written atomically as CSV and JSON (with
provenance).

``per_image/<subject>.npz`` holds each metric's per-image scores (``nsd_id`` order) for paired comparisons.

Units: PixCorr, SSIM, Eff, SwAV, LPIPS, DreamSim as fractions; Alex(2), Alex(5), Incep, CLIP and both retrievals
in %, as the papers report them. A metric that could not run holds its reason ("skipped: set --inception").
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.common import atomic_path, provenance, write_json_atomic
from experiments.evaluation.suite import METRIC_BY_KEY, EvaluationConfig, SubjectResult

# Published numbers (reference-nsd-eval.md 4.8). Test sets and averaging differ between rows; "tags" says where
# each number comes from ([2nd]: a third-party table quoting the paper, [recall]: unverified, [code]: a stored
# notebook output). Strings keep the published precision.
ANCHORS: tuple[dict[str, Any], ...] = (
    {"model": "MindEye2 40 sess, mean subj 1/2/5/7", "set": "new test, 1000 images",
     "tags": "PixCorr/SSIM/Incep/CLIP/Eff/SwAV [2nd]; Alex and retrieval [recall]",
     "values": {"pixcorr": ".322", "ssim": ".431", "alexnet2": "96.1", "alexnet5": "98.6", "inception": "95.4",
                "clip": "93.0", "effnet": ".619", "swav": ".344", "image_retrieval": "98.8",
                "brain_retrieval": "98.3"}},
    {"model": "MindEye2 1 sess, mean subj 1/2/5/7", "set": "new test, 1000 images",
     "tags": "all but Eff/SwAV [2nd]; Eff/SwAV [recall]",
     "values": {"pixcorr": ".195", "ssim": ".419", "alexnet2": "84.2", "alexnet5": "90.6", "inception": "81.2",
                "clip": "79.2", "effnet": ".810", "swav": ".468", "image_retrieval": "79.0",
                "brain_retrieval": "57.4"}},
    {"model": "MindEye2 40 sess, subj01 (enhanced)", "set": "new test, 1000 images",
     "tags": "[code] stored output of src/final_evaluations.ipynb",
     "values": {"pixcorr": ".374", "ssim": ".439", "alexnet2": "97.9", "alexnet5": "99.1", "inception": "96.0",
                "clip": "93.7", "effnet": ".607", "swav": ".336", "image_retrieval": "99.96",
                "brain_retrieval": "99.87"}},
    {"model": "MindEye1, mean subj 1/2/5/7", "set": "MindEye1 test, 982 images",
     "tags": "PixCorr/SSIM/Alex [2nd]; rest [recall]",
     "values": {"pixcorr": ".309", "ssim": ".323", "alexnet2": "94.7", "alexnet5": "97.8", "inception": "93.8",
                "clip": "94.1", "effnet": ".645", "swav": ".367", "image_retrieval": "93.6",
                "brain_retrieval": "90.1"}},
    {"model": "MindBridge, mean subj 1/2/5/7", "set": "MindEye1 test, 982 images (GT-selected samples)",
     "tags": "PixCorr/SSIM/Incep/CLIP/Eff/SwAV [2nd]; Alex [recall]",
     "values": {"pixcorr": ".151", "ssim": ".263", "alexnet2": "87.7", "alexnet5": "95.5", "inception": "92.4",
                "clip": "94.7", "effnet": ".712", "swav": ".418"}},
)


def format_value(metric: str, value: float | str) -> str:
    if isinstance(value, str):
        return value
    return f"{value:.2f}" if METRIC_BY_KEY[metric].percent else f"{value:.3f}"


def format_interval(metric: str, interval: tuple[float, float] | None) -> str:
    if interval is None:
        return ""
    return f"[{format_value(metric, interval[0])}, {format_value(metric, interval[1])}]"


def header(metric: str) -> str:
    info = METRIC_BY_KEY[metric]
    return f"{info.label} {'↑' if info.higher_is_better else '↓'}"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
                     for r in rows)


def render(results: list[SubjectResult], metrics: tuple[str, ...], bootstrap: int) -> str:
    """The printed report: values (skipped cells marked, reasons listed below), intervals, anchors."""
    notes: dict[str, str] = {}
    rows = [["", "images"] + [header(m) for m in metrics]]
    for result in results:
        cells = []
        for metric in metrics:
            value = result.values[metric]
            if isinstance(value, str):
                notes.setdefault(metric, value)
                cells.append("skipped*")
            else:
                cells.append(format_value(metric, value))
        rows.append([result.subject, str(result.num_images)] + cells)
    rows.append(["published (4.8)", ""] + [""] * len(metrics))
    for anchor in ANCHORS:
        rows.append([anchor["model"], ""] + [anchor["values"].get(m, "n/r") if METRIC_BY_KEY[m].kind not in
                                             ("lpips", "dreamsim") else "" for m in metrics])
    text = [_table(rows)]
    if notes:
        text.append("\n".join(f"* {METRIC_BY_KEY[m].label}: {reason}" for m, reason in notes.items()))
    if bootstrap and any(r.intervals for r in results):
        ci_rows = [["95% CI", ""] + [header(m) for m in metrics]]
        for result in results:
            ci_rows.append([result.subject, ""] + [format_interval(m, result.intervals.get(m)) for m in metrics])
        text.append(f"bootstrap over images ({bootstrap} resamples):\n" + _table(ci_rows))
    text.append("anchor test sets differ (see the JSON 'anchors' for each row's set and sources); "
                "Img ret / Brain ret follow MindEye2's direction labels")
    return "\n\n".join(text)


def csv_rows(results: list[SubjectResult], metrics: tuple[str, ...]) -> list[dict[str, str]]:
    rows = []
    for result in results:
        row = {"kind": "mean" if result.subject == "mean" else "subject", "subject": result.subject,
               "num_images": str(result.num_images)}
        for metric in metrics:
            value = result.values[metric]
            row[metric] = value if isinstance(value, str) else repr(float(value))
            interval = result.intervals.get(metric)
            row[f"{metric}_ci_low"] = repr(interval[0]) if interval else ""
            row[f"{metric}_ci_high"] = repr(interval[1]) if interval else ""
        rows.append(row)
    for anchor in ANCHORS:
        row = {"kind": "anchor", "subject": anchor["model"], "num_images": ""}
        for metric in metrics:
            row[metric] = anchor["values"].get(metric, "")
            row[f"{metric}_ci_low"] = row[f"{metric}_ci_high"] = ""
        rows.append(row)
    return rows


def write_csv(path: str | Path, results: list[SubjectResult], metrics: tuple[str, ...]) -> Path:
    rows = csv_rows(results, metrics)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)


def report_dict(results: list[SubjectResult], config: EvaluationConfig, inputs: dict[str, Any]) -> dict[str, Any]:
    metrics = config.metrics
    return {
        "metrics": {m: {"label": METRIC_BY_KEY[m].label, "unit": "%" if METRIC_BY_KEY[m].percent else "fraction",
                        "higher_is_better": METRIC_BY_KEY[m].higher_is_better,
                        "description": METRIC_BY_KEY[m].description} for m in metrics},
        "results": [{"subject": r.subject, "num_images": r.num_images,
                     "values": {m: r.values[m] for m in metrics},
                     "ci95": {m: list(r.intervals[m]) for m in metrics if m in r.intervals},
                     "notes": r.notes} for r in results],
        "anchors": [dict(a) for a in ANCHORS],
        "settings": {"antialias": config.antialias, "batch_size": config.batch_size, "device": config.device,
                     "bootstrap": config.bootstrap, "bootstrap_seed": config.seed, "candidates": config.candidates,
                     "draws": config.draws, "retrieval_seed": config.retrieval_seed, "strict": config.strict},
        "provenance": provenance(inputs=inputs, weights={k: (str(Path(v).resolve()) if v else None)
                                                         for k, v in config.weights.items()}),
    }


def write_per_image(path: str | Path, result: SubjectResult) -> Path:
    """``nsd_id`` and each computed metric's per-image score (fractions, not %) of one subject, as ``.npz``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, nsd_id=result.ids, **result.per_image)
    return Path(path)


def write_report(out_dir: str | Path, results: list[SubjectResult], config: EvaluationConfig,
                 inputs: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``out_dir/metrics.csv``, ``out_dir/metrics.json`` and ``out_dir/per_image/<subject>.npz``
    atomically; return the paths of the first two."""
    out_dir = Path(out_dir)
    for result in results:
        if result.ids is not None:
            write_per_image(out_dir / "per_image" / f"{result.subject}.npz", result)
    csv_path = write_csv(out_dir / "metrics.csv", results, config.metrics)
    json_path = out_dir / "metrics.json"
    write_json_atomic(json_path, report_dict(results, config, inputs))
    return csv_path, json_path
