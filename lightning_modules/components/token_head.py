"""The optional MindEye2 token target: one shared head from the level-averaged backbone to CLIP patch tokens."""

from __future__ import annotations

import torch
from torch import nn


class TokenHead(nn.Module):
    """(B, D) -> (B, T, C) with one Linear(D -> T * C) (256 x 1664 for ViT-bigG/14 at paper scale).

    Shared by all experts on purpose: a token head per expert would cost 30 x 545 M parameters at paper scale.
    """

    def __init__(self, in_dim: int = 1280, num_tokens: int = 256, token_dim: int = 1664):
        super().__init__()
        self.num_tokens, self.token_dim = num_tokens, token_dim
        self.linear = nn.Linear(in_dim, num_tokens * token_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).reshape(x.shape[0], self.num_tokens, self.token_dim)
