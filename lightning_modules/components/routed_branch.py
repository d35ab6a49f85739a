"""One conditioning branch of stage 2 (image or text): spatial router per level, then temporal router over levels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from lightning_modules.components.spatial_router import SpatialRouter
from lightning_modules.components.temporal_router import TemporalMode, TemporalRouter


@dataclass
class BranchSpec:
    """The routing of one branch, as written in YAML.

    temporal: ``soft`` | ``hard`` (straight-through) | ``fixed`` (schedule) | ``uniform`` (stage-1 level average).
    spatial: route experts per cell of a ``grid`` x ``grid`` latent map (False: experts of a level are pooled).
    regional: each cell's token is attended only by the latent positions of its cell (False: globally).
    source: ``prior`` (each expert's backbone embedding through the frozen stage-1 prior) or ``clip`` (the
        experts' clip-head embeddings, no prior).
    pool: experts of a level are summed (``sum``; the level sum stage 1 supervises) or averaged (``mean``; each
        prior output estimates the whole target, so ``mean`` keeps its scale).
    query_dim / temperature: temporal router width and temperature; spatial_dim / spatial_temperature: spatial
        router width and temperature.
    """

    temporal: TemporalMode = "soft"
    spatial: bool = True
    grid: int = 4
    regional: bool = True
    source: Literal["prior", "clip"] = "prior"
    pool: Literal["sum", "mean"] = "mean"
    query_dim: int = 768
    temperature: float = 1.0
    spatial_dim: int = 256
    spatial_temperature: float = 1.0


@dataclass
class BranchOutput:
    """tokens (B, T, D) with T = G (spatial) or 1; level_weights (B, L) used to mix levels; router_probs (B, L)
    the learned router's softmax (None for fixed/uniform); spatial_maps [(B, G, E_l)] or None."""

    tokens: torch.Tensor
    level_weights: torch.Tensor
    router_probs: torch.Tensor | None
    spatial_maps: list[torch.Tensor] | None


class RoutedBranch(nn.Module):
    """Per-level expert embeddings [(B, E_l, D)], noisy latent (B, C, h, w), timestep embedding (B, time_dim) and
    timesteps (B,) -> ``BranchOutput``."""

    def __init__(self, spec: BranchSpec, embed_dim: int, num_experts: list[int], time_dim: int,
                 latent_channels: int = 4, num_train_timesteps: int = 1000):
        super().__init__()
        self.spec, self.num_experts = spec, list(num_experts)
        self.temporal = TemporalRouter(time_dim, len(num_experts), spec.query_dim, spec.temperature, spec.temporal,
                                       num_train_timesteps)
        self.spatial = (SpatialRouter(latent_channels, embed_dim, num_experts, spec.grid, spec.spatial_dim,
                                      spec.spatial_temperature, spec.pool) if spec.spatial else None)

    @property
    def num_tokens(self) -> int:
        return self.spec.grid**2 if self.spatial is not None else 1

    def pooled_levels(self, experts: list[torch.Tensor]) -> torch.Tensor:
        """[(B, E_l, D)] -> (B, L, 1, D) sum or mean over each level's experts."""
        reduce = torch.sum if self.spec.pool == "sum" else torch.mean
        return torch.stack([reduce(x, 1) for x in experts], 1)[:, :, None]

    def forward(self, experts: list[torch.Tensor], latents: torch.Tensor, t_emb: torch.Tensor,
                timesteps: torch.Tensor) -> BranchOutput:
        if len(experts) != len(self.num_experts):
            raise ValueError(f"branch expects {len(self.num_experts)} levels, got {len(experts)}")
        if self.spatial is not None:
            level_tokens, maps = self.spatial(latents, experts)
        else:
            level_tokens, maps = self.pooled_levels(experts), None
        weights, probs = self.temporal(t_emb, timesteps)
        tokens = torch.einsum("bl,blgd->bgd", weights.to(level_tokens.dtype), level_tokens)
        return BranchOutput(tokens, weights, probs, maps)


# checkpoints store the branch specs among the hyperparameters; allow them in weights-only loading
torch.serialization.add_safe_globals([BranchSpec])
