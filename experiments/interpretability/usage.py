"""Expert usage and routing entropy on the test set: the quantities the ``RoutingStatistics`` callback logs during
training (``lightning_modules.metrics.LevelRoutingMetric``: entropy of the softmax over a parent's
children, each expert's gate-mass share and its balance, unit coverage), over every valid repeat of every test
image, in eval mode."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from experiments.interpretability.attribution import affine_adapter
from experiments.interpretability.figures import heatmap
from experiments.interpretability.loading import TestSet
from experiments.interpretability.outputs import write_csv, write_png
from experiments.interpretability.report import ReportItem
from lightning_modules.metrics import LevelRoutingMetric


@torch.no_grad()
def routing_usage(moe: nn.Module, adapters: nn.Module, subject: str, test: TestSet, batch_rows: int = 256,
                  ) -> list[dict[str, torch.Tensor]]:
    """Per level ``LevelRoutingMetric.compute()`` over the test rows (entropy, share (E_l,), share_cv,
    share_max_min, coverage (none, one, several), rows)."""
    weight, bias = affine_adapter(adapters, subject)
    metrics = [LevelRoutingMetric(e) for e in moe.num_experts]
    rows = test.voxels[test.repeat_mask]
    for start in range(0, len(rows), batch_rows):
        x = rows[start:start + batch_rows].to(weight.device)
        out = moe(x @ weight.T + bias)
        for metric, level in zip(metrics, out.routing):
            metric.update(level.probs.cpu(), level.indices.cpu(), torch.ones(len(x), dtype=torch.bool))
    return [m.compute() for m in metrics]


def usage_analysis(moe: nn.Module, adapters: nn.Module, subject: str, test: TestSet, out_dir: Path,
                   ) -> list[ReportItem]:
    """Writes ``usage/levels.csv`` (per level), ``usage/experts.csv`` (per expert) and a share heatmap."""
    folder = Path(out_dir) / "usage"
    stats = routing_usage(moe, adapters, subject, test)
    children = [moe.routers[level].num_children for level in range(len(stats))]
    level_rows = [[level, float(s["entropy"]), math.log(f), float(s["share_cv"]), float(s["share_max_min"]),
                   *[float(c) for c in s["coverage"]], int(s["rows"])]
                  for level, (s, f) in enumerate(zip(stats, children))]
    write_csv(folder / "levels.csv", ["level", "entropy_nats", "entropy_max_nats", "share_cv", "share_max_min",
                                      "coverage_none", "coverage_one", "coverage_several", "rows"], level_rows)
    expert_rows = []
    for level, s in enumerate(stats):
        parent = getattr(moe, f"parent_{level}").tolist()
        expert_rows += [[level, e, parent[e], float(v), float(v) * len(s["share"])]
                        for e, v in enumerate(s["share"])]
    write_csv(folder / "experts.csv", ["level", "expert", "parent", "gate_mass_share", "share_times_experts"],
              expert_rows)
    width = max(len(s["share"]) for s in stats)
    grid = np.full((len(stats), width), np.nan)
    for level, s in enumerate(stats):
        grid[level, : len(s["share"])] = s["share"].numpy() * len(s["share"])
    write_png(folder / "share.png", heatmap(grid, [f"level {lv}" for lv in range(len(stats))],
                                            [str(e) for e in range(width)],
                                            "gate-mass share x experts in level (1 = even)", diverging=False,
                                            annotate=width <= 16))
    return [ReportItem("Expert usage and routing entropy",
                       f"{subject}, {int(stats[0]['rows'])} test rows (every repeat), eval mode: the quantities the "
                       "RoutingStatistics callback logs in validation. Entropy of the softmax over a parent's "
                       "children (max log f); gate-mass share per expert (1/E_l = even); unit coverage: fraction "
                       "of units taken by no, one or several children.",
                       ["usage/share.png"], ["usage/levels.csv", "usage/experts.csv"])]
