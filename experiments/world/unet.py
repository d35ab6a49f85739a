"""The world's SDXL-shaped UNet, trained text-to-image on the VAE's scaled latents, and a guided Euler sampler.

``UNet2DConditionModel`` laid out like SDXL base (first down block without attention, ``text_time`` added
conditioning): (B, 4, h, w) noisy latents, (B,) timesteps, (B, L, 2 H) prompt (both text encoders' penultimate
hidden states) and added conditions {text_embeds (B, P), time_ids (B, 6)} -> (B, 4, h, w) predicted noise.
Trained with epsilon prediction on SDXL's scaled_linear betas (0.00085-0.012, 1000 steps), empty captions for
``uncond_prob`` of samples (classifier-free guidance), time_ids = (S, S, 0, 0, S, S).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from experiments.world.build_helpers import optimiser_step, progress, seed_everything
from lightning_modules.components.diffusion_loss import training_noise

BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


@dataclass
class UnetConfig:
    blocks: tuple[int, ...] = (32, 64, 128)
    heads: tuple[int, ...] = (2, 4, 8)
    layers_per_block: int = 1
    groups: int = 16
    time_embed_dim: int = 16  # addition_time_embed_dim
    steps: int = 1500
    batch: int = 64
    lr: float = 1e-3
    uncond_prob: float = 0.1
    noise_offset: float = 0.0  # std of the per-channel offset added to the training noise (0: plain noise)


def build_unet(cfg: UnetConfig, latent_size: int, cross_dim: int, pooled_dim: int):
    from diffusers import UNet2DConditionModel

    n = len(cfg.blocks)
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, layers_per_block=cfg.layers_per_block,
        block_out_channels=tuple(cfg.blocks), down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",), attention_head_dim=tuple(cfg.heads),
        transformer_layers_per_block=1, cross_attention_dim=cross_dim, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=cfg.time_embed_dim,
        projection_class_embeddings_input_dim=6 * cfg.time_embed_dim + pooled_dim, norm_num_groups=cfg.groups)


def euler_scheduler():
    """SDXL base's EulerDiscreteScheduler configuration."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(**BETAS, timestep_spacing="leading", steps_offset=1, prediction_type="epsilon",
                                  interpolation_type="linear", use_karras_sigmas=False)


def alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(BETAS["beta_start"] ** 0.5, BETAS["beta_end"] ** 0.5, BETAS["num_train_timesteps"]) ** 2
    return torch.cumprod(1 - betas, 0)


def time_ids(batch: int, image_size: int) -> torch.Tensor:
    """(B, 6) SDXL added time ids: original size, crop (0, 0), target size, all the pixel size."""
    s = float(image_size)
    return torch.tensor([s, s, 0.0, 0.0, s, s]).expand(batch, -1)


@torch.no_grad()
def encode_prompts(te1, te2, tokenizer, captions: list[str], batch: int = 512):
    """SDXL prompt encoding of ``captions``: (N, L, H1 + H2) penultimate hidden states of both encoders and
    (N, P) text encoder 2's projected pooled embedding."""
    hidden, pooled = [], []
    for i in range(0, len(captions), batch):
        ids = tokenizer(captions[i: i + batch], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        h1 = te1(ids, output_hidden_states=True).hidden_states[-2]
        out2 = te2(ids, output_hidden_states=True)
        hidden.append(torch.cat([h1, out2.hidden_states[-2]], -1))
        pooled.append(out2.text_embeds)
    return torch.cat(hidden), torch.cat(pooled)


def noisy(latents: torch.Tensor, gen: torch.Generator, acp: torch.Tensor, offset: float = 0.0):
    """(B, 4, h, w) -> (noisy latents, noise, timesteps) with timesteps uniform over the 1000 training steps.
    ``offset``: the offset noise of ``training_noise``."""
    t = torch.randint(0, len(acp), (len(latents),), generator=gen)
    noise = training_noise(latents, offset, gen)
    a = acp[t].view(-1, 1, 1, 1)
    return a.sqrt() * latents + (1 - a).sqrt() * noise, noise, t


def train_unet(cfg: UnetConfig, latents: torch.Tensor, latent_std: torch.Tensor, caption_index: torch.Tensor,
               prompt: torch.Tensor, pooled: torch.Tensor, empty: int, image_size: int, seed: int,
               show: bool = True):
    """Train on scaled latent means (N, 4, h, w) (+ ``latent_std`` (N, 4, h, w) posterior noise), captions given as
    indices (N, 5) into the encoded prompts (M, L, C) / (M, P); index ``empty`` is the empty caption."""
    gen = seed_everything(seed)
    unet = build_unet(cfg, latents.shape[-1], prompt.shape[-1], pooled.shape[-1])
    acp = alphas_cumprod()
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.steps, pct_start=0.05)
    ids = time_ids(cfg.batch, image_size)
    unet.train()
    losses = []
    for _ in progress(range(cfg.steps), "unet", enabled=show):
        idx = torch.randint(0, len(latents), (cfg.batch,), generator=gen)
        cap = caption_index[idx, torch.randint(0, caption_index.shape[1], (cfg.batch,), generator=gen)]
        cap = torch.where(torch.rand(cfg.batch, generator=gen) < cfg.uncond_prob, empty, cap)
        z0 = latents[idx] + latent_std[idx] * torch.randn(latents[idx].shape, generator=gen)
        zt, noise, t = noisy(z0, gen, acp, cfg.noise_offset)
        pred = unet(zt, t, encoder_hidden_states=prompt[cap],
                    added_cond_kwargs={"text_embeds": pooled[cap], "time_ids": ids}).sample
        loss = F.mse_loss(pred, noise)
        losses.append(optimiser_step(loss, opt, sched, unet.parameters()))
    return unet.eval(), {"final_loss": float(np.mean(losses[-100:]))}


@torch.no_grad()
def sample(unet, scheduler_config: dict, prompt: torch.Tensor, pooled: torch.Tensor, neg_prompt: torch.Tensor,
           neg_pooled: torch.Tensor, image_size: int, steps: int, guidance: float, seed: int,
           ip_tokens: torch.Tensor | None = None, neg_ip_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Guided Euler sampling -> (B, 4, h, w) scaled latents. prompt (B, L, C), pooled (B, P); the negative half
    (B, L, C) / (B, P); optional IP tokens (B, T, C) with their negative (zero-embedding) tokens."""
    from diffusers import EulerDiscreteScheduler

    from lightning_modules.components.injection import Injection

    scheduler = EulerDiscreteScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(steps)
    b = prompt.shape[0]
    size = unet.config.sample_size
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((b, unet.config.in_channels, size, size), generator=gen) * scheduler.init_noise_sigma
    cond = torch.cat([neg_prompt, prompt])
    pool = torch.cat([neg_pooled, pooled])
    ids = time_ids(2 * b, image_size)
    kwargs = None
    if ip_tokens is not None:
        kwargs = {"injection": Injection(ip_tokens=torch.cat([neg_ip_tokens, ip_tokens]))}
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(torch.cat([x, x]), t)
        eps = unet(inp, t, encoder_hidden_states=cond, added_cond_kwargs={"text_embeds": pool, "time_ids": ids},
                   cross_attention_kwargs=kwargs).sample
        e_neg, e_pos = eps.chunk(2)
        x = scheduler.step(e_neg + guidance * (e_pos - e_neg), t, x).prev_sample
    return x
