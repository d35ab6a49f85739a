"""Layers with one independent weight set per expert, applied to all experts of a level in one batched matmul."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class BatchedLinear(nn.Module):
    """E independent Linear(in -> out): (B, E, in) -> (B, E, out). Initialised like ``nn.Linear``."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.num_experts, self.in_features, self.out_features = num_experts, in_features, out_features
        self.weight = nn.Parameter(torch.empty(num_experts, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(num_experts, out_features)) if bias else None
        bound = 1 / math.sqrt(in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return torch.bmm(x.transpose(0, 1), self.weight).transpose(0, 1)
        return torch.baddbmm(self.bias.unsqueeze(1), x.transpose(0, 1), self.weight).transpose(0, 1)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, in={self.in_features}, out={self.out_features}"


class BatchedLayerNorm(nn.Module):
    """E independent LayerNorm(d) over the last axis: (B, E, d) -> (B, E, d)."""

    def __init__(self, num_experts: int, dim: int, eps: float = 1e-5):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(num_experts, dim))
        self.bias = nn.Parameter(torch.zeros(num_experts, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.bias, F.layer_norm(x, (self.dim,), eps=self.eps), self.weight)


class BatchedResidualMLP(nn.Module):
    """E independent residual MLP stacks (MindEye2 block: LN -> Linear -> GELU -> Dropout -> Linear, + input),
    (B, E, d) -> (B, E, d)."""

    def __init__(self, num_experts: int, dim: int, num_blocks: int = 4, dropout: float = 0.15):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"norm": BatchedLayerNorm(num_experts, dim), "fc1": BatchedLinear(num_experts, dim, dim),
                           "fc2": BatchedLinear(num_experts, dim, dim)}) for _ in range(num_blocks))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block["fc2"](self.dropout(F.gelu(block["fc1"](block["norm"](x)))))
        return x


class BatchedProjector(nn.Module):
    """E independent 3-layer CLIP projectors (LN, GELU, Linear d->h, LN, GELU, Linear h->h, LN, GELU,
    Linear h->d), (B, E, d) -> (B, E, d)."""

    def __init__(self, num_experts: int, dim: int, hidden: int):
        super().__init__()
        widths = [(dim, hidden), (hidden, hidden), (hidden, dim)]
        self.norms = nn.ModuleList(BatchedLayerNorm(num_experts, i) for i, _ in widths)
        self.linears = nn.ModuleList(BatchedLinear(num_experts, i, o) for i, o in widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, linear in zip(self.norms, self.linears):
            x = linear(F.gelu(norm(x)))
        return x
