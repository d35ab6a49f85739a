"""The ablation study's files: ``ablations.json`` (everything, with provenance), ``ablations.csv`` (one line per
row, subject and metric), ``ablations.png`` (the mean over subjects per row with 95% intervals, the shuffled
control dashed), ``ablations_grid.png`` (truth | every row, first subject) and ``report.md`` (our table, the
direction of every difference from the full model beside the paper's). Every file is written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datamodules.common import atomic_path, write_json_atomic
from experiments.interpretability.outputs import write_csv, write_figure
from experiments.studies.ablations import (
    COMPARED,
    EXTRA_LABELS,
    FULL,
    METRIC_LABELS,
    PAPER_ABLATION,
    PAPER_LABELS,
    PAPER_SOURCE,
    SHUFFLED,
)
from experiments.studies.reconstruction_rows import rows_grid

CSV_COLUMNS = ("row", "label", "subject", "metric", "value", "ci_low", "ci_high", "diff_vs_full", "diff_low",
               "diff_high", "paper_metric", "paper_value", "paper_direction", "our_direction", "agreement")


def csv_rows(record: dict[str, Any]) -> list[list[Any]]:
    """One line per (row, subject, metric); the mean's lines carry the difference from the full model and, on the
    compared metrics, the paper's value and both directions."""
    lines = []
    for row, subjects in record["rows"].items():
        comparison = record["comparison"].get(row, {})
        directions = {d["ours_metric"]: d for d in comparison.get("directions", [])}
        for subject, r in subjects.items():
            for metric in record["metrics"]:
                low, high = r["intervals"].get(metric, (None, None))
                diff = comparison.get("vs_full", {}).get(metric, {}) if subject == "mean" else {}
                d_low, d_high = diff.get("interval", (None, None))
                d = directions.get(metric, {}) if subject == "mean" else {}
                paper = d.get("paper_metric")
                lines.append([row, record["labels"][row], subject, metric, r["values"][metric], low, high,
                              diff.get("diff"), d_low, d_high, paper,
                              PAPER_ABLATION.get(row, {}).get(paper) if paper else None, d.get("paper"),
                              d.get("ours"), d.get("agreement")])
    return lines


def plot(record: dict[str, Any], path: Path) -> Path:
    """One panel per metric: the mean over subjects per row (horizontal bars, 95% interval), the full model
    dark, the shuffled control's value dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in record["rows"] if r != SHUFFLED]
    metrics = record["metrics"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 0.35 * len(rows) + 1.4), sharey=True)
    for ax, metric in zip(axes, metrics):
        means = [record["rows"][r]["mean"] for r in rows]
        values = [m["values"][metric] for m in means]
        errors = [[v - m["intervals"].get(metric, (v, v))[0] for v, m in zip(values, means)],
                  [m["intervals"].get(metric, (v, v))[1] - v for v, m in zip(values, means)]]
        ax.barh(range(len(rows)), values, xerr=errors, capsize=2,
                color=["#2b5d8a" if r == FULL else "#8fb3d3" for r in rows])
        ax.axvline(record["rows"][SHUFFLED]["mean"]["values"][metric], color="grey", ls="--", lw=1,
                   label="shuffled brains")
        ax.set_title(METRIC_LABELS[metric], fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(rows)), [record["labels"][r] for r in rows], fontsize=8)
    axes[0].invert_yaxis()
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    write_figure(path, fig)
    return Path(path)


def _cell(values: dict, intervals: dict, metric: str) -> str:
    v, (low, high) = values[metric], intervals.get(metric, (float("nan"), float("nan")))
    fmt = "{:.1f}" if metric in ("clip", "clip_top1") else "{:.3f}"
    return f"{fmt.format(v)} [{fmt.format(low)}, {fmt.format(high)}]"


def _diff(diff: dict, metric: str) -> str:
    fmt = "{:+.1f}" if metric in ("clip", "clip_top1") else "{:+.3f}"
    low, high = diff.get("interval", (float("nan"), float("nan")))
    return f"{fmt.format(diff['diff'])} [{fmt.format(low)}, {fmt.format(high)}]"


def report(record: dict[str, Any]) -> str:
    """The study as markdown: settings and time, our table, the directions beside the paper's, the control."""
    study, labels, rows = record["study"], record["labels"], record["rows"]
    full = rows[FULL]["mean"]
    steps = study["inference_steps"] or "the config's"
    n = {s: r["num_images"] for s, r in rows[FULL].items() if s != "mean"}
    lines = ["# Stage-2 ablations on the learned world", "",
             f"Data `{study['data_dir']}` ({', '.join(f'{s}: {k}' for s, k in n.items())} test images), world "
             f"`{study['world']}`, stage 1 `{study['image_encoder']}` and `{study['text_encoder']}`. Every row "
             f"fitted {study['epochs']} epochs from seed {study['seed']} (same data, steps and sampler: "
             f"{steps} inference steps), evaluated by the evaluation suite with "
             f"the world's CLIP; 95% bootstrap intervals over images ({study['bootstrap']} replicates). This "
             f"invocation took {record['seconds']['total']:.0f} s (steps an earlier one finished are read back).",
             "",
             "## Ours (mean over subjects)", "",
             "| row | " + " | ".join(METRIC_LABELS[m] for m in record["metrics"]) + " |",
             "|---|" + "---:|" * len(record["metrics"])]
    for row, subjects in rows.items():
        m = subjects["mean"]
        lines.append(f"| {labels[row]} | " + " | ".join(_cell(m["values"], m["intervals"], k)
                                                         for k in record["metrics"]) + " |")
    lines += ["", f"Chance: CLIP 2-way 50%, CLIP top-1 {100 / min(n.values()):.1f}%.", "",
              f"## Direction of each difference from {labels[FULL]}: the paper's beside ours", "",
              f"Paper: {PAPER_SOURCE}; its values as printed (two-way as fractions). Ours: the row minus the full "
              "model, a paired bootstrap interval; `tie` where it includes 0. "
              + "; ".join(f"our {METRIC_LABELS[o]} beside the paper's {PAPER_LABELS[p]}" for o, p in COMPARED)
              + ".", "",
              "| row | " + " | ".join(f"paper {PAPER_LABELS[p]} (full -> row) | ours {METRIC_LABELS[o]} diff | "
                                      f"direction paper / ours" for o, p in COMPARED) + " | paper worse on |",
              "|---|" + "---|---:|---|" * len(COMPARED) + "---:|"]
    counts = {"agrees": 0, "differs": 0, "unresolved": 0}
    for row, entry in record["comparison"].items():
        if "directions" not in entry:  # the full model, and the unit-router row (not in the paper)
            continue
        cells = []
        for d in entry["directions"]:
            o, p = d["ours_metric"], d["paper_metric"]
            counts[d["agreement"]] += 1
            cells += [f"{PAPER_ABLATION[FULL][p]:.3f} -> {PAPER_ABLATION[row][p]:.3f}", _diff(entry["vs_full"][o], o),
                      f"{d['paper']} / {d['ours']}: **{d['agreement']}**"]
        lines.append(f"| {labels[row]} | " + " | ".join(cells) + f" | {entry['paper_worse_on']} of 4 |")
    lines += ["", f"Directions: {counts['agrees']} agree, {counts['differs']} differ, {counts['unresolved']} "
              "unresolved (our interval includes 0).", ""]
    beside = [r for r in EXTRA_LABELS if r in record["comparison"]]
    if beside:
        lines += [f"## Routers and baselines side by side: each row minus {labels[FULL]}", "",
                  "The same stage-2 row on other stage-1 encoders (fitted by the study with the reference encoders' "
                  "configs): the router that keeps unit identity (`moe.scoring: unit`) and the dense baseline "
                  "(capacity factor 2, no expert choice); and the full model's stage 2 on a ridge regression's "
                  "predicted embeddings.", "",
                  "| row | " + " | ".join(METRIC_LABELS[m] for m in record["metrics"]) + " |",
                  "|---|" + "---:|" * len(record["metrics"])]
        for row in beside:
            diff = record["comparison"][row]["vs_full"]
            lines.append(f"| {labels[row]} | " + " | ".join(_diff(diff[m], m) for m in record["metrics"]) + " |")
        lines.append("")
    lines += ["## Control: every row against the shuffled brains (CLIP 2-way)", "",
              f"Shuffled: {_cell(rows[SHUFFLED]['mean']['values'], rows[SHUFFLED]['mean']['intervals'], 'clip')} "
              f"(the full model, {labels[FULL]} at {full['values']['clip']:.1f}%, fed other images' brains).", "",
              "| row | margin over shuffled [95% CI] |", "|---|---:|"]
    for row, entry in record["comparison"].items():
        lines.append(f"| {labels[row]} | {_diff(entry['over_shuffled_clip'], 'clip')} |")
    lines += ["", "Files: `ablations.csv`, `ablations.json` (with provenance), `ablations.png`, `ablations_grid.png`."]
    return "\n".join(lines) + "\n"


def write_outputs(record: dict[str, Any], results: dict[str, list], out: Path) -> dict[str, Path]:
    """Write every file of the study under ``out`` -> {name: path}."""
    out = Path(out)
    paths = {"json": out / "ablations.json", "csv": out / "ablations.csv", "png": out / "ablations.png",
             "grid": out / "ablations_grid.png", "report": out / "report.md"}
    write_json_atomic(paths["json"], record)
    write_csv(paths["csv"], CSV_COLUMNS, csv_rows(record))
    plot(record, paths["png"])
    subject = next(iter(results[FULL][0:1])).subject
    rows_grid(Path(record["study"]["data_dir"]), subject, {r: Path(d) for r, d in record["reconstructions"].items()},
              paths["grid"])
    with atomic_path(paths["report"]) as tmp:
        tmp.write_text(report(record))
    return paths
