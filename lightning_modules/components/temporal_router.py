"""Temporal router of stage 2: the diffusion timestep decides how the hierarchy's levels are mixed."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

TemporalMode = Literal["soft", "hard", "fixed", "uniform"]


class TemporalRouter(nn.Module):
    """(B, time_dim) sinusoidal timestep embedding and (B,) timesteps -> level weights (B, L) and the router's
    softmax (B, L) (the distribution the KL term sees; equal to the weights in ``soft`` mode).

    ``soft``: softmax over scaled dot products of a query Linear(time_dim -> query_dim) with L learnable level keys
    (MoRE-Brain's DiffuseTimeRouterAttn, temperature ``tau``). ``hard``: the argmax level one-hot in the forward
    pass, the softmax's gradient in the backward pass (straight-through). ``fixed``: level
    clamp(floor((1 - t / T) * L), 0, L - 1) (noisy steps -> coarse level 0; no parameters). ``uniform``: 1 / L,
    which reproduces stage 1's level average (no parameters).
    """

    def __init__(self, time_dim: int, num_levels: int = 4, query_dim: int = 768, temperature: float = 1.0,
                 mode: TemporalMode = "soft", num_train_timesteps: int = 1000):
        super().__init__()
        if mode not in ("soft", "hard", "fixed", "uniform"):
            raise ValueError(f"temporal router mode {mode!r}: choose soft, hard, fixed or uniform")
        self.mode, self.num_levels, self.temperature = mode, num_levels, temperature
        self.num_train_timesteps = num_train_timesteps
        self.learned = mode in ("soft", "hard")
        if self.learned:
            self.query = nn.Linear(time_dim, query_dim)
            self.level_keys = nn.Parameter(torch.randn(num_levels, query_dim))
            self.scale = 1.0 / (math.sqrt(query_dim) * temperature)

    def probabilities(self, t_emb: torch.Tensor) -> torch.Tensor:
        """(B, time_dim) -> softmax over levels (B, L) of the learned router."""
        scores = self.query(t_emb.to(self.query.weight.dtype)) @ self.level_keys.t() * self.scale
        return scores.softmax(-1)

    def forward(self, t_emb: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch = t_emb.shape[0]
        if self.mode == "uniform":
            return t_emb.new_full((batch, self.num_levels), 1.0 / self.num_levels, dtype=torch.float32), None
        if self.mode == "fixed":
            frac = 1.0 - timesteps.float().to(t_emb.device) / self.num_train_timesteps
            level = (frac * self.num_levels).floor().clamp(0, self.num_levels - 1).long()
            return F.one_hot(level, self.num_levels).float(), None
        probs = self.probabilities(t_emb)
        if self.mode == "hard":
            hard = F.one_hot(probs.argmax(-1), self.num_levels).to(probs.dtype)
            return hard + probs - probs.detach(), probs
        return probs, probs
