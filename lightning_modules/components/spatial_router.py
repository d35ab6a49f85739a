"""Spatial router of stage 2: cross-attention from a fixed grid of the noisy latent to each level's experts."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SpatialRouter(nn.Module):
    """Noisy latent (B, C, h, w) and per-level expert embeddings [(B, E_l, D)] -> per-level tokens (B, L, G, D)
    and routing maps [(B, G, E_l)].

    The latent is average-pooled to a ``grid`` x ``grid`` map whatever its resolution; each of the G = grid^2 cells
    gives a query Linear(C -> dim) plus a learned cell embedding. Keys are Linear(D -> dim) of the expert
    embeddings plus a learned identity per expert. Softmax over the experts of each level per query gives the
    routing map (every level in one softmax, the other levels' experts masked out); the cell's token is the
    weighted combination of the level's expert embeddings (values are the embeddings themselves, so tokens stay in
    the experts' space), scaled by E_l when ``pool`` is ``sum`` (uniform weights then give the level sum) or left
    as the weighted mean when ``pool`` is ``mean``.
    """

    def __init__(self, latent_channels: int, embed_dim: int, num_experts: list[int], grid: int = 4, dim: int = 256,
                 temperature: float = 1.0, pool: str = "sum"):
        super().__init__()
        self.grid, self.num_experts, self.pool = grid, list(num_experts), pool
        self.query = nn.Linear(latent_channels, dim)
        self.cell_embedding = nn.Parameter(torch.randn(grid * grid, dim) * 0.02)
        self.key = nn.Linear(embed_dim, dim)
        self.expert_embedding = nn.Parameter(torch.randn(sum(num_experts), dim) * 0.02)
        self.scale = 1.0 / (math.sqrt(dim) * temperature)
        level = torch.tensor([lv for lv, count in enumerate(num_experts) for _ in range(count)])  # (sum E,)
        # (L, 1, sum E): 0 on the level's own experts, -inf elsewhere, so one softmax routes every level at once
        own = level[None, None] == torch.arange(len(num_experts))[:, None, None]
        self.register_buffer("level_bias", torch.where(own, 0.0, float("-inf")), persistent=False)
        scale = torch.tensor(num_experts, dtype=torch.float32) if pool == "sum" else torch.ones(len(num_experts))
        self.register_buffer("level_scale", scale[:, None, None], persistent=False)  # (L, 1, 1)

    def forward(self, latents: torch.Tensor, experts: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        dtype = self.query.weight.dtype
        cells = F.adaptive_avg_pool2d(latents.to(dtype), self.grid).flatten(2).transpose(1, 2)  # (B, G, C)
        q = self.query(cells) + self.cell_embedding  # (B, G, dim)
        everything = torch.cat(experts, 1).to(dtype)  # (B, sum E, D)
        k = self.key(everything) + self.expert_embedding
        scores = (q @ k.transpose(1, 2)) * self.scale  # (B, G, sum E)
        weights = (scores[:, None] + self.level_bias.to(dtype)).softmax(-1)  # (B, L, G, sum E), 0 off the level
        tokens = (weights @ everything[:, None]) * self.level_scale.to(dtype)  # (B, L, G, D)
        starts = [sum(self.num_experts[:level]) for level in range(len(self.num_experts))]
        maps = [weights[:, level, :, start:start + count]
                for level, (start, count) in enumerate(zip(starts, self.num_experts))]
        return tokens, maps
