"""Classifier-free guidance assembly for stage 2: the unconditional (negative) half, condition dropout in training
and the guided noise prediction eps = eps_u + s * (eps_c - eps_u).

The negative half is the negative prompt with its pooled embedding and zero brain image tokens (the brain tokens of
an all-zero expert embedding through the image token projection); a regional text prompt is global there.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_modules.components.injection import Injection


def unconditional(negative_prompt: torch.Tensor, negative_pooled: torch.Tensor, image_projection: nn.Module | None,
                  embed_dim: int | None, injection: Injection, batch: int, device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Negative prompt (S, C) and pooled (P,) embeddings and, with an image branch (``image_projection`` of
    ``embed_dim``-wide expert embeddings), zero brain image tokens -> (B, S, C), (B, P), (B, T, C) or None; T as
    many tokens as ``injection.ip_tokens`` holds."""
    ip = None
    if image_projection is not None:
        tokens = injection.ip_tokens.shape[1] // image_projection.num_tokens
        zeros = torch.zeros(batch, tokens, embed_dim, device=device)
        ip = image_projection(zeros)
    return (negative_prompt.expand(batch, -1, -1), negative_pooled.expand(batch, -1), ip)


def drop_conditions(drop: torch.Tensor, prompt: torch.Tensor, pooled: torch.Tensor, injection: Injection,
                    negative: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``drop`` (B,) bool get the ``negative`` half (``unconditional``): prompt (B, S, C), pooled (B, P) and the
    injection's image tokens replaced in place (regional text off there); returns the new prompt and pooled."""
    neg_prompt, neg_pooled, neg_ip = negative
    prompt = torch.where(drop[:, None, None], neg_prompt.to(prompt.dtype), prompt)
    pooled = torch.where(drop[:, None], neg_pooled.to(pooled.dtype), pooled)
    if neg_ip is not None:
        injection.ip_tokens = torch.where(drop[:, None, None], neg_ip.to(injection.ip_tokens.dtype),
                                          injection.ip_tokens)
    if injection.text_rows is not None:
        injection.text_rows = injection.text_rows & ~drop
    return prompt, pooled


def guided_batch(prompt: torch.Tensor, pooled: torch.Tensor, injection: Injection,
                 negative: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The doubled batch of one guided step: the ``negative`` half first, then the conditional one; the injection
    is doubled in place (regional text only on the conditional half). Returns the prompt and pooled (2B, ...)."""
    neg_prompt, neg_pooled, neg_ip = negative
    prompt, pooled = torch.cat([neg_prompt, prompt.to(neg_prompt.dtype)]), torch.cat([neg_pooled, pooled])
    if injection.ip_tokens is not None:
        injection.ip_tokens = torch.cat([neg_ip, injection.ip_tokens])
    if injection.text_rows is not None:
        injection.text_rows = torch.cat([torch.zeros_like(injection.text_rows), injection.text_rows])
    return prompt, pooled


def guide(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: eps_u + scale * (eps_c - eps_u)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)
