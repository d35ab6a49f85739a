"""What the spatial positive control writes: ``spatial_control.json`` (every number, with provenance),
``spatial_control.csv`` (per branch, level and step bin, plus ``all`` steps: the learned statistic, its null's mean
and 95% band, z and p, and the random and planted checks), ``spatial_control_experts.csv`` (per expert: low-level
share of its voxel map, retinotopic or not, object-minus-background routing weight), ``spatial_control.png``
(statistic against the step bin with the null band, one panel per branch and level) and ``report.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from datamodules.common import atomic_path, write_json_atomic
from experiments.interpretability.outputs import write_csv, write_figure

HEADER = ["branch", "level", "bin", "t_first", "t_last", "observed", "null_mean", "null_lo", "null_hi", "z", "p",
          "random_observed", "random_p", "planted_observed", "planted_p", "false_positive_rate"]


def levels(record: dict[str, Any]):
    for branch, b in record["branches"].items():
        for level, r in enumerate(b["levels"]):
            yield branch, level, r


def summary_rows(record: dict[str, Any]) -> list[list[Any]]:
    t = record["timesteps"]
    rows = []
    for branch, level, r in levels(record):
        learned, random, planted = r["learned"], r["random"], r["planted"]
        null_all = learned["null_mean"], learned["null_mean"] - 1.96 * learned["null_sd"], \
            learned["null_mean"] + 1.96 * learned["null_sd"]
        rows.append([branch, level, "all", t[0], t[-1], learned["observed"], *null_all, learned["z"], learned["p"],
                     random["observed"], random["p"], planted["observed"], planted["p"], r["false_positive_rate"]])
        lb, rb, pb = learned["bins"], random["bins"], planted["bins"]
        for i, steps in enumerate(record["step_bins"]):
            rows.append([branch, level, i, t[steps[0]], t[steps[-1]], lb["observed"][i], lb["null_mean"][i],
                         lb["null_lo"][i], lb["null_hi"][i], lb["z"][i], lb["p"][i], rb["observed"][i], rb["p"][i],
                         pb["observed"][i], pb["p"][i], ""])
    return rows


def expert_rows(record: dict[str, Any]) -> list[list[Any]]:
    return [[branch, level, e, share, int(e in r["retinotopic"]), contrast]
            for branch, level, r in levels(record)
            for e, (share, contrast) in enumerate(zip(r["low_level_share"], r["expert_object_minus_background"]))]


def figure(record: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    branches = list(record["branches"])
    count = max(len(b["levels"]) for b in record["branches"].values())
    fig, axes = plt.subplots(len(branches), count, figsize=(3.0 * count, 2.6 * len(branches)), squeeze=False)
    t = np.asarray(record["timesteps"])
    centres = [float(t[s].mean()) for s in record["step_bins"]]
    for (branch, level, r), ax in zip(levels(record), [a for row in axes for a in row]):
        lb = r["learned"]["bins"]
        ax.fill_between(centres, lb["null_lo"], lb["null_hi"], color="grey", alpha=0.3, label="null 95%")
        ax.plot(centres, lb["observed"], "o-", color="#2b5d8a", label="learned")
        ax.plot(centres, r["planted"]["bins"]["observed"], "s--", color="#c0504d", ms=3, label="planted")
        ax.axhline(0, color="black", lw=0.5)
        ax.invert_xaxis()  # the sampler runs from noisy (large t) to clean
        ax.set_title(f"{branch} L{level} ({len(r['retinotopic'])}/{r['experts']} retino.), "
                     f"p={r['learned']['p']:.3f}", fontsize=8)
        ax.set_xlabel("timestep t", fontsize=7)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("object - background\nretinotopic mass", fontsize=7)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    return write_figure(path, fig)


def verdict(record: dict[str, Any]) -> str:
    """One sentence per branch: which levels route the object's cells to retinotopic experts beyond the null."""
    tests = sum(len(b["levels"]) for b in record["branches"].values())
    out = []
    for branch, b in record["branches"].items():
        passed = [f"L{lvl} (z {r['learned']['z']:+.1f}, p {r['learned']['p']:.3f})"
                  for lvl, r in enumerate(b["levels"]) if r["learned"]["p"] <= record["alpha"] / tests]
        out.append(f"{branch}: " + (f"object cells route to retinotopic experts beyond the null at {', '.join(passed)}"
                                    if passed else "no level routes the object's cells to retinotopic experts "
                                    f"beyond the null (Bonferroni over {tests} tests)") + ".")
    return " ".join(out)


def report_text(record: dict[str, Any]) -> str:
    lines = ["# Spatial routing: positive control", "",
             f"{record['num_images']} test reconstructions of {', '.join(record['subjects'])} "
             f"({record['predict_dir']}), {len(record['timesteps'])} denoising steps, a {record['grid']} x "
             f"{record['grid']} routing grid (the object touches {record['object_cells_mean']:.1f} cells on "
             "average). Statistic: per image the coverage-weighted retinotopic routing mass of the object's cells "
             "minus its mean over the cells the object does not touch, averaged over images and steps. Null: "
             f"{record['permutations']} shuffles of the object masks across images within each subject (one-sided "
             "p). Retinotopic experts: low-level share of the expert's |integrated gradients| voxel map above its "
             "level's mean. Checks with the same masks, labels and null: random routing (the learned router's mean "
             f"map plus noise; false-positive rate at p <= {record['alpha']} over {record['calibration_draws']} "
             f"draws) and planted routing ({record['planted_strength']:g} x coverage of a cell's weight moved to the "
             "retinotopic experts).", "",
             "| branch | level | retinotopic | low-level share (min-max) | statistic | null mean +- sd | z | p | "
             "random p | false-positive rate | planted stat | planted p |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for branch, level, r in levels(record):
        a, s = r["learned"], r["low_level_share"]
        lines.append(f"| {branch} | {level} | {len(r['retinotopic'])}/{r['experts']} | {min(s):.3f}-{max(s):.3f} "
                     f"| {a['observed']:+.4f} | {a['null_mean']:+.4f} +- {a['null_sd']:.4f} | {a['z']:+.2f} | "
                     f"{a['p']:.3f} | {r['random']['p']:.3f} | {r['false_positive_rate']:.3f} | "
                     f"{r['planted']['observed']:+.4f} | {r['planted']['p']:.3f} |")
    lines += ["", verdict(record), "", "![statistic per step bin](spatial_control.png)", ""]
    return "\n".join(lines)


def write_outputs(record: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "spatial_control.json", record)
    write_csv(out / "spatial_control.csv", HEADER, summary_rows(record))
    write_csv(out / "spatial_control_experts.csv",
              ["branch", "level", "expert", "low_level_share", "retinotopic", "object_minus_background"],
              expert_rows(record))
    figure(record, out / "spatial_control.png")
    with atomic_path(out / "report.md") as tmp:
        Path(tmp).write_text(report_text(record))
