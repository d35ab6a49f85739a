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


class BatchedReferenceLevel0(nn.Module):
    """What the reference's level-0 experts compute: the input plus learned constants, (B, E, d) -> (B, E, d).

    The reference runs MindEye2's ``BrainNetwork.forward_feat`` with sequence length 1: each of its ``num_blocks``
    mixer steps is ``x = block2(x^T) + residual2`` with ``residual2`` the previous step's output, so the width-d
    ``block1`` output never reaches the result, and ``block2`` (LayerNorm over one element, whose output is its
    bias, then Linear(1,1) -> GELU -> Dropout -> Linear(1,1)) is a constant. Output: x + sum_k c_k with
    c_k = w2_k * dropout(gelu(w1_k * beta_k + b1_k)) + b2_k per expert (dropout drawn per element, as there).
    Parameters: the 6 scalars of every channel block per expert (the LayerNorm's weight gets no gradient, as in the
    reference); the dead width-d mixer weights are not built.
    """

    def __init__(self, num_experts: int, num_blocks: int = 4, dropout: float = 0.15):
        super().__init__()
        shape = (num_experts, num_blocks)
        self.norm_weight = nn.Parameter(torch.ones(shape))  # LayerNorm(1).weight: multiplies 0, never used
        self.norm_bias = nn.Parameter(torch.zeros(shape))
        bound = 1.0  # nn.Linear(1, 1): uniform(-1/sqrt(1), 1/sqrt(1))
        self.w1 = nn.Parameter(torch.empty(shape).uniform_(-bound, bound))
        self.b1 = nn.Parameter(torch.empty(shape).uniform_(-bound, bound))
        self.w2 = nn.Parameter(torch.empty(shape).uniform_(-bound, bound))
        self.b2 = nn.Parameter(torch.empty(shape).uniform_(-bound, bound))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = self.norm_bias + 0 * self.norm_weight  # LayerNorm over one element: (x - mean) = 0
        hidden = F.gelu(self.w1 * normed + self.b1)  # (E, K)
        for k in range(hidden.shape[1]):
            h = hidden[:, k, None].to(x.dtype).expand_as(x)
            x = x + self.w2[:, k, None].to(x.dtype) * self.dropout(h) + self.b2[:, k, None].to(x.dtype)
        return x
