"""Retrieval metrics (MindEye2 convention) as pure functions and a DDP-exact torchmetrics ``Metric``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


def retrieval_top1(preds: torch.Tensor, targets: torch.Tensor, candidates: int = 300, draws: int = 30,
                   seed: int = 0) -> tuple[float, float]:
    """Forward (brain -> image) and backward (image -> brain) top-1 accuracy among ``min(candidates, N)`` random
    candidates, averaged over ``draws`` draws (one draw, all items, when N <= candidates). (N, D), (N, D)."""
    preds, targets = F.normalize(preds.float(), dim=-1), F.normalize(targets.float(), dim=-1)
    n = preds.shape[0]
    k = min(candidates, n)
    generator = torch.Generator().manual_seed(seed)
    fwd = bwd = 0.0
    rounds = draws if n > candidates else 1
    for _ in range(rounds):
        subset = torch.randperm(n, generator=generator)[:k].to(preds.device) if n > candidates \
            else torch.arange(n, device=preds.device)
        sim = preds[subset] @ targets[subset].T
        labels = torch.arange(k, device=preds.device)
        fwd += (sim.argmax(1) == labels).float().mean().item()
        bwd += (sim.argmax(0) == labels).float().mean().item()
    return fwd / rounds, bwd / rounds


class RetrievalMetric(Metric):
    """Collects (preds, targets, ids) across batches and ranks; ``compute`` returns forward/backward top-1 over
    ``min(candidates, N)`` candidates and ``draws`` draws, on items sorted by id (identical on every rank)."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, candidates: int = 300, draws: int = 30, seed: int = 0):
        super().__init__()
        self.candidates, self.draws, self.seed = candidates, draws, seed
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")
        self.add_state("ids", default=[], dist_reduce_fx="cat")

    def update(self, preds: torch.Tensor, targets: torch.Tensor, ids: torch.Tensor) -> None:
        self.preds.append(preds.detach().float())
        self.targets.append(targets.detach().float())
        self.ids.append(ids.detach())

    def compute(self) -> dict[str, torch.Tensor]:
        ids = dim_zero_cat(self.ids)
        order = ids.argsort()
        fwd, bwd = retrieval_top1(dim_zero_cat(self.preds)[order], dim_zero_cat(self.targets)[order],
                                  self.candidates, self.draws, self.seed)
        return {"fwd_top1": torch.tensor(fwd), "bwd_top1": torch.tensor(bwd), "count": torch.tensor(len(ids))}
