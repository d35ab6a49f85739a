"""Text branch of stage 2: routed brain text tokens -> SDXL prompt embeddings and pooled text embedding."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

PromptMode = Literal["reference", "projected"]
PooledMode = Literal["zeros", "projected"]


class BrainPrompt(nn.Module):
    """(B, T, D) routed brain text tokens -> prompt (B, S, C), pooled (B, P) and the grid cell of every prompt
    position (S,) (-1 = every cell; None when T == 1).

    ``reference`` (MoRE-Brain): [SOS, e x (S - 1)] in the text-encoder-2 half (D must equal its width) and zeros in
    the text-encoder-1 half, where SOS is text encoder 2's penultimate-layer start token (``sos`` buffer, (C,)
    with the te1 half zeroed). ``projected``: a learned Linear(D -> C) of every token after the full SOS.
    With T > 1 tokens (spatial routing) prompt positions 1.. cycle through the T cells.
    Pooled: zeros (reference) or a learned Linear(D -> P) of the token mean.
    """

    def __init__(self, embed_dim: int, cross_dim: int, pooled_dim: int, sos: torch.Tensor, seq_len: int = 77,
                 mode: PromptMode = "reference", pooled: PooledMode = "zeros"):
        super().__init__()
        self.embed_dim, self.cross_dim, self.pooled_dim, self.seq_len = embed_dim, cross_dim, pooled_dim, seq_len
        self.mode, self.pooled_mode = mode, pooled
        if sos.shape != (cross_dim,):
            raise ValueError(f"SOS embedding has shape {tuple(sos.shape)}, expected ({cross_dim},)")
        if mode == "reference" and embed_dim > cross_dim:
            raise ValueError(f"brain text width {embed_dim} exceeds the cross-attention width {cross_dim}")
        self.proj = nn.Linear(embed_dim, cross_dim) if mode == "projected" else None
        self.register_buffer("sos", torch.empty_like(sos), persistent=False)
        self.set_sos(sos)
        self.pooled_proj = nn.Linear(embed_dim, pooled_dim) if pooled == "projected" else None

    def set_sos(self, sos: torch.Tensor) -> None:
        """The start token (C,); ``reference`` zeroes its CLIP-L half (the first C - D entries)."""
        sos = sos.detach().clone().to(self.sos.device, self.sos.dtype)
        if self.mode == "reference":
            sos[: self.cross_dim - self.embed_dim] = 0
        self.sos = sos

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        b, t, d = tokens.shape
        body_len = self.seq_len - 1
        order = torch.arange(body_len, device=tokens.device) % t
        body = tokens[:, order]  # (B, S - 1, D)
        if self.proj is not None:
            body = self.proj(body.to(self.proj.weight.dtype))
        else:
            body = torch.cat([body.new_zeros(b, body_len, self.cross_dim - d), body], -1)
        prompt = torch.cat([self.sos.to(body.dtype).expand(b, 1, -1), body], 1)
        if self.pooled_proj is not None:
            pooled = self.pooled_proj(tokens.mean(1).to(self.pooled_proj.weight.dtype))
        else:
            pooled = tokens.new_zeros(b, self.pooled_dim)
        cells = torch.cat([order.new_full((1,), -1), order]) if t > 1 else None
        return prompt, pooled, cells
