"""Diffusion training loss: epsilon MSE per sample with min-SNR-gamma weighting."""

from __future__ import annotations

import torch


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at ``timesteps`` (B,)."""
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return a / (1 - a)


def min_snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float | None) -> torch.Tensor:
    """(B,) weights min(SNR, gamma) / SNR for epsilon prediction (ones when ``gamma`` is None)."""
    if gamma is None:
        return torch.ones(len(timesteps), device=timesteps.device)
    s = snr(alphas_cumprod, timesteps)
    return torch.minimum(s, torch.full_like(s, gamma)) / s


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, ...) prediction and target -> (B,) mean squared error per sample (float32)."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(B, ...) prediction and target, (B,) weights -> scalar mean of per-sample MSE times weight."""
    return (per_sample_mse(pred, target) * weights).mean()
