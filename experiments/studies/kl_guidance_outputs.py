"""What the temporal-router study writes: JSON record, CSV tables, the curves' arrays, a figure and a report.

``temporal_router_study.json`` (every number, with provenance), ``temporal_router_study.csv`` (one row per run
and branch: KL to the target, Spearman rho of the expected level with t, expected level at clean and noisy steps,
and the run's reconstruction metrics), ``temporal_router_curves.csv`` (per run, branch and timestep bin: the
router's mean level softmax), ``temporal_router_curves.npz`` (full resolution), ``temporal_router_study.png``
(one row per branch: untrained | each fit | KL target) and ``report.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from datamodules.common import atomic_path, write_json_atomic
from experiments.interpretability.outputs import write_csv, write_npz, write_png
from experiments.interpretability.temporal_routing import bin_means

RECON_METRICS = ("pixcorr", "ssim", "clip", "clip_top1")
NUM_BINS = 20


def summary_rows(record: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for name, run in record["runs"].items():
        recon = (run.get("reconstructions") or {}).get("values", {})
        for branch, r in run["routers"].items():
            rows.append([name, "" if run["kl_weight"] is None else run["kl_weight"], run.get("scoring") or "",
                         branch, r["kl_to_target"],
                         r["spearman_level_vs_t"], r["expected_level_clean"], r["expected_level_noisy"],
                         *[recon.get(m, "") for m in RECON_METRICS]])
    return rows


SUMMARY_HEADER = ["run", "kl_weight", "stage1_scoring", "branch", "kl_to_target", "spearman_level_vs_t", "expected_level_clean",
                  "expected_level_noisy", *RECON_METRICS]


def curve_rows(arrays: dict[str, dict[str, np.ndarray]], branches: list[str]) -> tuple[list[str], list[list]]:
    first = next(iter(arrays.values()))
    levels = first[f"{branches[0]}_probs"].shape[1]
    rows = []
    for name, a in arrays.items():
        for branch in branches:
            for kind in ("probs", "target"):
                edges, means = bin_means(a[f"{branch}_{kind}"], min(NUM_BINS, len(a["timesteps"])))
                label = name if kind == "probs" else "kl_target"
                if kind == "target" and name != next(iter(arrays)):
                    continue  # one target per branch: every run shares the KL settings
                rows += [[label, branch, int(lo), int(hi) - 1, *means[b].tolist()]
                         for b, (lo, hi) in enumerate(zip(edges[:-1], edges[1:]))]
    return ["run", "branch", "t_first", "t_last", *[f"level{lvl}" for lvl in range(levels)]], rows


def figure(arrays: dict[str, dict[str, np.ndarray]], branches: list[str]) -> np.ndarray:
    """(H, W, 3) uint8: one row per branch, panels untrained | each fit | KL target (``curve_image``)."""
    from callbacks.routing_statistics import curve_image

    rows = []
    for branch in branches:
        panels = []
        for name, a in arrays.items():
            t = torch.from_numpy(a["timesteps"])
            panels.append(curve_image(t, torch.from_numpy(a[f"{branch}_probs"]), f"{branch}, {name}"))
        a = next(iter(arrays.values()))
        panels.append(curve_image(torch.from_numpy(a["timesteps"]), torch.from_numpy(a[f"{branch}_target"]),
                                  f"{branch}, KL target"))
        rows.append(np.concatenate(panels, 1))
    return np.concatenate(rows, 0)


def report_text(record: dict[str, Any]) -> str:
    lines = ["# Temporal router against its prior", "",
             "The same stage-2 fit with the KL guidance off and on, and the untrained router both start from. "
             "KL is KL(router softmax || Gaussian level target) averaged over every training timestep; rho is the "
             "Spearman correlation of the router's expected level with t (the target's is "
             f"{next(iter(next(iter(record['runs'].values()))['routers'].values()))['target_spearman_level_vs_t']:.2f}"
             ": noisy steps on coarse levels); the reconstructions are the test images of every subject, scored "
             "with the world's CLIP.", "",
             "Runs named `_unit` are the same fits on stage-1 encoders whose router keeps unit identity.", "",
             "| run | stage-1 router | branch | KL to target | rho(level, t) | E[level] clean / noisy | PixCorr | SSIM "
             "| CLIP 2-way | CLIP top-1 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in summary_rows(record):
        name, _, scoring, branch, kl, rho, clean, noisy, *recon = row
        recon_cells = " | ".join("" if v == "" else (f"{v:.3f}" if k in ("pixcorr", "ssim") else f"{v:.1f}%")
                                 for k, v in zip(RECON_METRICS, recon))
        lines.append(f"| {name} | {scoring} | {branch} | {kl:.4f} | {rho:+.2f} | {clean:.2f} / {noisy:.2f} | {recon_cells} |")
    lines += ["", verdict(record), "", "![curves](temporal_router_study.png)", ""]
    return "\n".join(lines)


def verdict(record: dict[str, Any]) -> str:
    """Per stage-1 router and branch, one sentence: does the KL-off run approach the target from where the
    untrained router was?"""
    runs = record["runs"]
    out = []
    for scoring in record.get("scorings", ["value"]):
        mine = {n: r for n, r in runs.items() if r.get("scoring", "value") == scoring and r["kl_weight"] is not None}
        off = next((n for n, r in mine.items() if r["kl_weight"] == 0), None)
        on = [n for n, r in mine.items() if r["kl_weight"]]
        if off is None or not on:
            out.append(f"No KL-off / KL-on pair was run on the {scoring} router's encoders.")
            continue
        for branch in record["branches"]:
            kl0 = runs["untrained"]["routers"][branch]["kl_to_target"]
            kl_off = runs[off]["routers"][branch]["kl_to_target"]
            kl_on = runs[on[-1]]["routers"][branch]["kl_to_target"]
            moved = (kl0 - kl_off) / max(kl0 - kl_on, 1e-12)
            if moved <= 0:
                finding = ("the KL-off fit ends farther from the target than the router it started from: the "
                           "coarse-to-fine schedule is imposed by the KL term, not learned")
            else:
                finding = (f"the KL-off fit covers {100 * moved:.0f}% of the way the KL term takes it: the schedule "
                           f"is {'learned' if moved > 0.5 else 'mostly imposed by the KL term'}")
            out.append(f"{scoring} router's encoders, {branch}: KL to the target {kl0:.4f} untrained, {kl_off:.4f} "
                       f"with the KL off, {kl_on:.4f} with it on ({on[-1]}); {finding}.")
    return " ".join(out)


def write_outputs(record: dict[str, Any], arrays: dict[str, dict[str, np.ndarray]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    branches = record["branches"]
    write_json_atomic(out / "temporal_router_study.json", record)
    write_csv(out / "temporal_router_study.csv", SUMMARY_HEADER, summary_rows(record))
    write_csv(out / "temporal_router_curves.csv", *curve_rows(arrays, branches))
    write_npz(out / "temporal_router_curves.npz",
              **{f"{name}__{k}": v for name, a in arrays.items() for k, v in a.items()})
    write_png(out / "temporal_router_study.png", figure(arrays, branches))
    with atomic_path(out / "report.md") as tmp:
        Path(tmp).write_text(report_text(record))
