"""Expert-choice routing on scalar tokens (MoRE-Brain), vectorised over samples, parents and experts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

UnitScoring = Literal["value", "unit", "value_unit"]


@dataclass
class RoutingResult:
    """What one level's router decided.

    inputs: (B, E, k) selected units times their gate probability (the experts' inputs).
    indices: (B, E, k) sorted positions of the selected units in the parent's units (level 0: adapter units).
    gates: (B, E, k) gate probability of each selected unit for its expert.
    probs: (B, P, u, f) softmax over a parent's f children for each of its u units (P parents).
    """

    inputs: torch.Tensor
    indices: torch.Tensor
    gates: torch.Tensor
    probs: torch.Tensor


class ExpertChoiceRouter(nn.Module):
    """Each parent's u scalar units are routed among its f children by expert choice.

    Gate Linear(1 -> f) per parent (``P * f`` scalars): logit of unit d for child c is ``w[p, c] * x_d``;
    probabilities are a softmax over the children; every child takes the top ``k`` units by its probability
    (``k = floor(u / f * capacity_factor)``), sorted by position so that position j of an expert's input is
    deterministic. Training noise (std ``noise_std``) is added to the probabilities after the softmax, as in the
    reference. Level 0 is ``P = 1`` parent (the adapter output) with ``f = E_0`` children.

    ``scoring`` says what a unit's score depends on. ``value`` (the reference): only its value, so which units an
    expert receives, and in which order, changes with every sample (position j of an expert's input is a
    different unit from one sample to the next). ``unit``: a learned affinity ``a[p, d, c]`` of unit d for child c
    (which unit it is, not its value; the paper's voxel-to-expert affinity): every sample routes the same units to
    the same expert in the same order, a learned partition whose gates still weight the inputs and train the
    affinities. ``value_unit``: both terms added, a stable unit identity modulated by the value. Affinities start
    as N(0, ``affinity_init``), so the initial partition is random.

    (B, P, u) -> RoutingResult with inputs (B, P * f, k); child ``p * f + c`` belongs to parent ``p``.
    """

    def __init__(self, num_parents: int, num_children: int, units: int, capacity_factor: float = 1.0,
                 gate_init: float = 1e-4, noise_std: float = 1e-3, scoring: UnitScoring = "value",
                 affinity_init: float = 1.0):
        super().__init__()
        self.num_parents, self.num_children, self.units = num_parents, num_children, units
        self.capacity = int(units / num_children * capacity_factor)
        if not 1 <= self.capacity <= units:
            raise ValueError(f"capacity {self.capacity} must be in [1, {units}] (units={units}, "
                             f"children={num_children}, capacity_factor={capacity_factor})")
        if scoring not in ("value", "unit", "value_unit"):
            raise ValueError(f"scoring must be value, unit or value_unit, got {scoring!r}")
        self.noise_std, self.scoring = noise_std, scoring
        self.weight = nn.Parameter(torch.empty(num_parents, num_children).uniform_(-gate_init, gate_init))
        self.affinity = (nn.Parameter(torch.randn(num_parents, units, num_children) * affinity_init)
                         if scoring != "value" else None)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, P, u) -> (B, P, u, f) the score of every unit for every child."""
        if self.scoring == "unit":
            return self.affinity[None].expand(x.shape[0], -1, -1, -1)
        value = x.unsqueeze(-1) * self.weight[None, :, None, :]
        return value + self.affinity[None] if self.scoring == "value_unit" else value

    def forward(self, x: torch.Tensor) -> RoutingResult:
        probs = torch.softmax(self.logits(x), dim=-1)  # (B, P, u, f)
        if self.training and self.noise_std > 0:
            probs = probs + self.noise_std * torch.randn_like(probs)
        by_child = probs.permute(0, 1, 3, 2)  # (B, P, f, u)
        indices = by_child.topk(self.capacity, dim=-1, sorted=False).indices.sort(dim=-1).values
        gates = by_child.gather(-1, indices)  # (B, P, f, k)
        values = x.unsqueeze(2).expand(-1, -1, self.num_children, -1).gather(-1, indices)
        batch = x.shape[0]
        flat = (batch, self.num_parents * self.num_children, self.capacity)
        return RoutingResult(inputs=(values * gates).reshape(flat), indices=indices.reshape(flat),
                             gates=gates.reshape(flat), probs=probs)


def routing_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the softmax over children, (B, P, u, f) -> scalar."""
    p = probs.clamp_min(1e-12)
    return -(p * p.log()).sum(-1).mean()


def balance_loss(probs: torch.Tensor) -> torch.Tensor:
    """Differentiable load balance: squared coefficient of variation of the mean gate probability per expert,
    (B, P, u, f) -> scalar (0 when every expert gets the same mean gate mass)."""
    load = probs.mean(dim=(0, 2)).reshape(-1)  # (P * f,)
    return load.var(unbiased=False) / load.mean().clamp_min(1e-12) ** 2
