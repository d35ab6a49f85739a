"""Bottleneck analysis: test retrieval and embedding quality of stage-1 runs against the adapter width ``b_size``.

Reads finished runs (``config.yaml`` + ``checkpoints/last.ckpt``, e.g. ``make slurm-bottleneck``'s array), tests
any that have no ``test_metrics.json`` yet, and writes one row per run and subject, the mean over subjects per
(target, width), a CSV, a JSON and a PNG plot.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from datamodules.common import provenance, write_json_atomic
from experiments.interpretability.outputs import write_csv, write_figure
from experiments.studies.runs import test_of_saved_run

METRICS = ("fwd_top1", "bwd_top1", "cosine", "mse", "prior_fwd_top1", "prior_cosine")


def find_runs(roots: list[Path]) -> list[Path]:
    """Run directories below ``roots``: those holding ``checkpoints/last.ckpt`` and ``config.yaml``."""
    runs = set()
    for root in roots:
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"--runs: no directory {root}")
        for last in root.rglob("checkpoints/last.ckpt"):
            if (last.parent.parent / "config.yaml").is_file():
                runs.add(last.parent.parent)
    if not runs:
        raise FileNotFoundError(f"no finished runs (config.yaml + checkpoints/last.ckpt) below {list(map(str, roots))}")
    return sorted(runs)


def run_rows(directory: Path) -> list[dict[str, Any]]:
    """One row per subject of a run: width (``b_size``; None = no bottleneck), target and test metrics."""
    config = yaml.safe_load((directory / "config.yaml").read_text())
    model = config["model"]["init_args"]
    hidden = model["moe"]["init_args"].get("hidden_dim")
    metrics = test_of_saved_run(directory)
    subjects = sorted({k.split("/")[1] for k in metrics if k.count("/") == 2})
    return [{"run": str(directory), "b_size": model.get("b_size"), "hidden_dim": hidden,
             "target": model.get("target", "clip_image"), "subject": s,
             **{m: metrics.get(f"test/{s}/{m}") for m in METRICS}} for s in subjects]


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean over subjects per (target, width), sorted by width (no bottleneck last)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["target"], r["b_size"])].append(r)
    out = []
    for (target, b), members in groups.items():
        row = {"target": target, "b_size": b, "subjects": len(members)}
        for m in METRICS:
            values = [r[m] for r in members if r[m] is not None]
            row[m] = sum(values) / len(values) if values else None
        out.append(row)
    return sorted(out, key=lambda r: (r["target"], math.inf if r["b_size"] is None else r["b_size"]))


def plot(summary: list[dict[str, Any]], path: Path) -> None:
    """Retrieval (fwd, bwd) and cosine against width, one line per target (log2 width; no bottleneck = H)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for target in sorted({r["target"] for r in summary}):
        rows = [r for r in summary if r["target"] == target and r["b_size"] is not None]
        widths = [r["b_size"] for r in rows]
        axes[0].plot(widths, [r["fwd_top1"] for r in rows], "o-", label=f"{target} image retrieval (fwd)")
        axes[0].plot(widths, [r["bwd_top1"] for r in rows], "s--", label=f"{target} brain retrieval (bwd)")
        axes[1].plot(widths, [r["cosine"] for r in rows], "o-", label=target)
        for r in summary:
            if r["target"] == target and r["b_size"] is None:
                axes[0].axhline(r["fwd_top1"], color="grey", lw=0.8, ls=":", label=f"{target} no bottleneck")
    for ax, label in zip(axes, ("test top-1", "test cosine to target")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bottleneck width b")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    write_figure(path, fig)


def bottleneck_report(roots: list[Path], out: Path) -> dict[str, Any]:
    """Rows, summary, CSV / JSON / PNG under ``out``; returns the JSON record."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [row for run in find_runs(roots) for row in run_rows(run)]
    summary = summarise(rows)
    columns = ["target", "b_size", "subjects", *METRICS]
    write_csv(out / "bottleneck.csv", columns, [[r[c] for c in columns] for r in summary])
    plot(summary, out / "bottleneck.png")
    record = {"rows": rows, "summary": summary, "provenance": provenance(runs=[str(r) for r in roots])}
    write_json_atomic(out / "bottleneck.json", record)
    return record


def format_summary(summary: list[dict[str, Any]]) -> str:
    def f(v):
        return "   -  " if v is None else f"{v:6.3f}"
    lines = [f"{'target':12} {'b_size':>7} {'subj':>4} {'fwd':>6} {'bwd':>6} {'cosine':>6} {'mse':>6}"]
    for r in summary:
        width = "none" if r["b_size"] is None else str(r["b_size"])
        lines.append(f"{r['target']:12} {width:>7} {r['subjects']:4d} {f(r['fwd_top1'])} {f(r['bwd_top1'])} "
                     f"{f(r['cosine'])} {f(r['mse'])}")
    return "\n".join(lines)
