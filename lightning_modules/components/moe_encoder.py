"""The subject-independent hierarchical mixture of experts (MoRE-Brain stage 1), all experts of a level batched."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from lightning_modules.components.batched_layers import (
    BatchedLinear,
    BatchedProjector,
    BatchedReferenceLevel0,
    BatchedResidualMLP,
)
from lightning_modules.components.routers import ExpertChoiceRouter, RoutingResult, UnitScoring, balance_loss


@dataclass
class LevelRouting:
    """Routing record of one level: ``gates``/``indices`` (B, E_l, k_l) (level 0 in adapter-unit coordinates,
    deeper levels in parent-output coordinates), ``parent`` (E_l,) parent expert index (-1 at level 0), and the
    full probabilities ``probs`` (B, P, u, f)."""

    gates: torch.Tensor
    indices: torch.Tensor
    parent: torch.Tensor
    probs: torch.Tensor


@dataclass
class MoEOutput:
    """backbone / clip: per level (B, E_l, D); *_level_sums (B, L, D); *_mean (B, D) = average over levels of the
    per-level sums; routing: one ``LevelRouting`` per level; balance: differentiable balance term (scalar)."""

    backbone: list[torch.Tensor]
    clip: list[torch.Tensor]
    routing: list[LevelRouting]
    balance: torch.Tensor

    @property
    def backbone_level_sums(self) -> torch.Tensor:
        return torch.stack([b.sum(1) for b in self.backbone], 1)

    @property
    def clip_level_sums(self) -> torch.Tensor:
        return torch.stack([c.sum(1) for c in self.clip], 1)

    @property
    def backbone_mean(self) -> torch.Tensor:
        return self.backbone_level_sums.mean(1)

    @property
    def clip_mean(self) -> torch.Tensor:
        return self.clip_level_sums.mean(1)


class HierarchicalMoE(nn.Module):
    """(B, H) adapter output -> ``MoEOutput``.

    Level 0 routes the H units among ``e0`` experts; level l routes each parent's output among its own ``factor``
    children (2 -> 4 -> 8 -> 16 by default). Level-0 experts are residual MLPs at their input width
    (H / e0 * capacity_factor; MindEye2 blocks), deeper experts a Linear (reference) or a one-block residual MLP.
    Every expert has a ``backbone`` head Linear(h_l -> D) and a 3-layer ``clip`` projector head on top of it.
    ``scoring`` / ``affinity_init``: what a unit's routing score depends on (``ExpertChoiceRouter``): its value
    (``value``, the reference), which unit it is (``unit``) or both (``value_unit``).

    ``level0``: ``mlp`` (default) the working residual MLPs above; ``identity`` what the reference's level-0 experts
    effectively compute, the routed input plus learned constants (``BatchedReferenceLevel0``), for faithful
    comparisons.
    """

    def __init__(self, hidden_dim: int = 4096, out_dim: int = 1280, num_experts_0: int = 2, factor: int = 2,
                 num_levels: int = 4, capacity_factor: float = 1.0, num_blocks: int = 4, dropout: float = 0.15,
                 deep_expert: Literal["linear", "mlp"] = "linear", clip_hidden: int | None = None,
                 gate_init: float = 1e-4, noise_std: float = 1e-3, level0: Literal["mlp", "identity"] = "mlp",
                 scoring: UnitScoring = "value", affinity_init: float = 1.0):
        super().__init__()
        if level0 not in ("mlp", "identity"):
            raise ValueError(f"model.moe level0 {level0!r}: choose mlp or identity")
        self.hidden_dim, self.out_dim, self.num_levels = hidden_dim, out_dim, num_levels
        self.routers, self.experts = nn.ModuleList(), nn.ModuleList()
        self.backbone_heads, self.clip_heads = nn.ModuleList(), nn.ModuleList()
        parents, children, units = 1, num_experts_0, hidden_dim
        self.num_experts: list[int] = []
        self.widths: list[int] = []
        for level in range(num_levels):
            router = ExpertChoiceRouter(parents, children, units, capacity_factor, gate_init, noise_std, scoring,
                                        affinity_init)
            experts_here, width = parents * children, router.capacity
            if level == 0 and level0 == "identity":
                expert = BatchedReferenceLevel0(experts_here, num_blocks, dropout)
            elif level == 0:
                expert = BatchedResidualMLP(experts_here, width, num_blocks, dropout)
            elif deep_expert == "mlp":
                expert = BatchedResidualMLP(experts_here, width, 1, dropout)
            else:
                expert = BatchedLinear(experts_here, width, width)
            self.routers.append(router)
            self.experts.append(expert)
            self.backbone_heads.append(BatchedLinear(experts_here, width, out_dim))
            self.clip_heads.append(BatchedProjector(experts_here, out_dim, clip_hidden or 2 * out_dim))
            self.num_experts.append(experts_here)
            self.widths.append(width)
            parent = torch.arange(experts_here) // children if level else torch.full((experts_here,), -1)
            self.register_buffer(f"parent_{level}", parent, persistent=False)
            parents, children, units = experts_here, factor, width

    def forward(self, x: torch.Tensor) -> MoEOutput:
        backbone, clip, routing, balance = [], [], [], x.new_zeros(())
        features = x.unsqueeze(1)  # (B, 1, H): one parent at level 0
        for level in range(self.num_levels):
            route: RoutingResult = self.routers[level](features)
            out = self.experts[level](route.inputs)  # (B, E_l, h_l)
            emb = self.backbone_heads[level](out)
            backbone.append(emb)
            clip.append(self.clip_heads[level](emb))
            routing.append(LevelRouting(route.gates, route.indices, getattr(self, f"parent_{level}"), route.probs))
            balance = balance + balance_loss(route.probs)
            features = out
        return MoEOutput(backbone, clip, routing, balance / self.num_levels)
