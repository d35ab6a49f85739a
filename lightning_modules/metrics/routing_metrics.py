"""Routing statistics of the hierarchical MoE and of stage 2's routers, as torchmetrics with sum states.

Sum states make the values exact under DDP: every rank adds its rows, ``compute`` all-reduces the sums, so a
two-process run reports what one process computes over the same samples.

Per stage-1 level (``LevelRouting``: probs (B, P, u, f), indices (B, E, k) in parent-output coordinates):
- entropy: mean over rows, parents and units of the entropy (nats) of the softmax over a parent's children;
- gate-mass share per expert: the expert's summed gate probability over rows and units, as a share of the level;
  balance as its coefficient of variation and max / min ratio;
- unit coverage: fraction of (row, unit) pairs selected by no, one, or several of the parent's children;
- stability (``jaccard``): overlap of each expert's selected unit set between two routings of the same rows.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


def level_row_statistics(probs: torch.Tensor, indices: torch.Tensor) -> dict[str, torch.Tensor]:
    """One level's routing -> per-row ``entropy`` (B,), gate ``mass`` per expert (B, E) and ``coverage`` (B, 3)
    (units taken by 0, 1, >= 2 children, summed over parents)."""
    b, parents, units, children = probs.shape
    p = probs.float().clamp_min(1e-12)
    entropy = -(p * p.log()).sum(-1).mean((1, 2))
    mass = probs.float().sum(2).reshape(b, parents * children)
    taken = torch.zeros(b, parents, units, device=probs.device)
    taken.scatter_add_(-1, indices.reshape(b, parents, -1), torch.ones(b, parents, indices.shape[-1] * children,
                                                                       device=probs.device))
    coverage = torch.stack([(taken == 0).sum((1, 2)), (taken == 1).sum((1, 2)), (taken >= 2).sum((1, 2))], 1)
    return {"entropy": entropy, "mass": mass, "coverage": coverage.float()}


def jaccard(previous: torch.Tensor, current: torch.Tensor, units: int) -> torch.Tensor:
    """Mean over rows and experts of |A & B| / |A | B| of the selected unit sets, (n, E, k) x2 -> scalar."""
    def one_hot(idx: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(*idx.shape[:2], units, dtype=torch.bool, device=idx.device)
        return out.scatter_(-1, idx, True)

    a, b = one_hot(previous), one_hot(current)
    inter, union = (a & b).sum(-1).float(), (a | b).sum(-1).float()
    return (inter / union.clamp_min(1)).mean()


class LevelRoutingMetric(Metric):
    """Accumulates ``level_row_statistics`` of valid rows; ``compute`` -> entropy, share (E,), share_cv,
    share_max_min, coverage fractions (none, one, several), rows."""

    full_state_update = False

    def __init__(self, num_experts: int):
        super().__init__()
        self.add_state("entropy_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("rows", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("mass", torch.zeros(num_experts, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("coverage", torch.zeros(3, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, probs: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor) -> None:
        stats = level_row_statistics(probs, indices)
        m = mask.to(probs.device).double()
        self.entropy_sum += (stats["entropy"].double() * m).sum()
        self.rows += m.sum()
        self.mass += (stats["mass"].double() * m[:, None]).sum(0)
        self.coverage += (stats["coverage"].double() * m[:, None]).sum(0)

    def compute(self) -> dict[str, torch.Tensor]:
        share = self.mass / self.mass.sum().clamp_min(1e-12)
        return {"entropy": self.entropy_sum / self.rows.clamp_min(1), "share": share,
                "share_cv": share.std(unbiased=False) / share.mean().clamp_min(1e-12),
                "share_max_min": share.max() / share.min().clamp_min(1e-12),
                "coverage": self.coverage / self.coverage.sum().clamp_min(1), "rows": self.rows}


class SpatialEntropyMetric(Metric):
    """Mean entropy (nats) of stage 2's spatial routing maps (B, G, E_l) per level, over valid rows and cells."""

    full_state_update = False

    def __init__(self, num_levels: int):
        super().__init__()
        self.add_state("entropy_sum", torch.zeros(num_levels, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("rows", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, maps: list[torch.Tensor]) -> None:
        for level, m in enumerate(maps):
            p = m.detach().double().clamp_min(1e-12)
            self.entropy_sum[level] += (-(p * p.log()).sum(-1).mean(-1)).sum()
        self.rows += maps[0].shape[0]

    def compute(self) -> torch.Tensor:
        return self.entropy_sum / self.rows.clamp_min(1)


@torch.no_grad()
def temporal_curve(router, time_embed, num_train_timesteps: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """A temporal router's level weights at every timestep, computed from the router alone:
    (timesteps (T,), weights (T, L)). ``time_embed`` maps (T,) timesteps to the UNet's sinusoidal embedding."""
    t = torch.arange(num_train_timesteps)
    device = next(iter(router.parameters()), torch.empty(0)).device
    t = t.to(device)
    weights, _ = router(time_embed(t).float(), t)
    return t.cpu(), weights.detach().float().cpu()
