"""Diffusion training loss: epsilon MSE per sample with min-SNR-gamma weighting, and the training noise."""

from __future__ import annotations

import torch


def training_noise(latents: torch.Tensor, offset: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, h, w) standard normal noise, plus offset noise (a per-sample, per-channel constant of
    std ``offset``, diffusers' ``noise_offset``) when ``offset`` is set. Without it a model reads an image's mean
    brightness from the starting noise's mean (the low frequencies survive the last timestep) and ignores its
    conditioning for it: reconstructions come out mid-grey whatever the stimulus."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if offset:
        noise = noise + offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator,
                                             device=latents.device, dtype=latents.dtype)
    return noise


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
