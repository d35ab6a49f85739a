"""The world's VAE: a small ``AutoencoderKL`` with SDXL's 4 latent channels, trained on scene images.

(B, 3, S, S) in [-1, 1] -> latents (B, 4, S / f, S / f) with f = 2 ** (len(blocks) - 1) -> (B, 3, S, S). Loss:
L1 + MSE of the reconstruction from a posterior sample, each pixel weighted 1 + ``foreground_weight`` where it
differs from its image's median colour (the object: a few percent of the pixels, which an unweighted loss lets the
decoder paint in one mean colour), plus a small KL term. ``scaling_factor`` = 1 / std of the
trained VAE's latent means over held-out scenes (SDXL's 0.13025 plays this role), written into its config.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from experiments.world.build_helpers import optimiser_step, progress, seed_everything
from experiments.world.scenes import Scenes


@dataclass
class VaeConfig:
    blocks: tuple[int, ...] = (16, 32, 64)  # 3 blocks: downscale 4
    layers_per_block: int = 1
    groups: int = 2  # GroupNorm groups: with one channel per group (instance norm) the decoder loses absolute colour
    steps: int = 600
    batch: int = 32
    lr: float = 2e-3
    kl_weight: float = 1e-6
    foreground_weight: float = 10.0  # extra weight of the pixels away from the background colour
    foreground_threshold: float = 0.1  # max |pixel - image median| over channels, in [0, 1] pixel units
    crop: int | None = None  # train on random crops of this size (fully convolutional: 4x cheaper at half size)


def build_vae(cfg: VaeConfig, image_size: int):
    from diffusers import AutoencoderKL

    n = len(cfg.blocks)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(cfg.blocks),
                         layers_per_block=cfg.layers_per_block, latent_channels=4, norm_num_groups=cfg.groups,
                         sample_size=image_size, scaling_factor=1.0)


def train_vae(cfg: VaeConfig, scenes: Scenes, image_size: int, seed: int, show: bool = True):
    """Train on ``scenes``; returns (vae, info)."""
    gen = seed_everything(seed)
    vae = build_vae(cfg, image_size)
    x_all = torch.from_numpy(scenes.pixels()) * 2 - 1
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    vae.train()
    losses = []
    for _ in progress(range(cfg.steps), "vae", enabled=show):
        x = x_all[torch.randint(0, len(x_all), (cfg.batch,), generator=gen)]
        weight = 1.0 + cfg.foreground_weight * foreground_mask(x, cfg.foreground_threshold)  # whole images' medians
        if cfg.crop:  # one offset per batch
            i, j = torch.randint(0, image_size - cfg.crop + 1, (2,), generator=gen).tolist()
            x, weight = x[..., i: i + cfg.crop, j: j + cfg.crop], weight[..., i: i + cfg.crop, j: j + cfg.crop]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        loss = weighted_reconstruction_loss(rec, x, weight) + cfg.kl_weight * post.kl().mean()
        losses.append(optimiser_step(loss, opt, sched, vae.parameters()))
    return vae.eval(), {"final_loss": float(np.mean(losses[-50:]))}


def foreground_mask(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B, 3, S, S) in [-1, 1] -> (B, 1, S, S) 1.0 where a pixel is more than ``threshold`` (in [0, 1] units) away
    from its image's per-channel median colour."""
    median = x.flatten(2).median(-1).values[..., None, None]
    return ((x - median).abs().amax(1, keepdim=True) > 2 * threshold).float()


def weighted_reconstruction_loss(rec: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Pixel-weighted mean of L1 + squared error: (B, 3, S, S) pairs, weight (B, 1, S, S) -> scalar."""
    err = rec - x
    return ((err.abs() + err ** 2) * weight).sum() / (weight.sum() * x.shape[1])


@torch.no_grad()
def latent_means(vae, pixels: np.ndarray, batch: int = 128) -> torch.Tensor:
    """(N, 3, S, S) in [0, 1] -> (N, 4, h, w) unscaled posterior means."""
    return torch.cat([vae.encode(torch.from_numpy(pixels[i: i + batch]) * 2 - 1).latent_dist.mean
                      for i in range(0, len(pixels), batch)])


@torch.no_grad()
def reconstruct(vae, pixels: np.ndarray, batch: int = 128) -> np.ndarray:
    """(N, 3, S, S) in [0, 1] -> reconstructions from the posterior mean, same shape, clipped to [0, 1]."""
    out = [vae.decode(vae.encode(torch.from_numpy(pixels[i: i + batch]) * 2 - 1).latent_dist.mean).sample
           for i in range(0, len(pixels), batch)]
    return ((torch.cat(out) + 1) / 2).clamp(0, 1).numpy()


def scaling_factor(vae, pixels: np.ndarray) -> float:
    """1 / std of the latent means of ``pixels`` (held-out scenes)."""
    return float(1.0 / latent_means(vae, pixels).std())
