"""Brain -> CLIP diffusion prior on one token (MindEye2 recipe) from diffusers blocks.

A ``PriorTransformer`` with no text tokens sees [brain embedding, time, noisy target, prd] and predicts the clean
target (x0 prediction) under a cosine schedule (``squaredcos_cap_v2``, 100 steps by default). Condition dropout
replaces the brain embedding with a learned null embedding, which classifier-free guidance uses at sampling time
(DDIM, 30 steps, guidance 1.5 by default; ``trailing`` timestep spacing, so the first step starts from pure noise
at t = T - 1: ``leading`` spacing, diffusers' default and this prior's before, starts 10 steps of 100 at t = 90,
from a partly clean sample that the noise does not match). Sampling takes an optional ``torch.Generator`` so that it is
deterministic (stage 2 uses a fixed noise seed).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


class DiffusionPrior(nn.Module):
    """(B, D) brain embedding -> (B, D) CLIP embedding.

    ``timestep_spacing``: of the DDIM sampling steps (``trailing``: the first is T - 1; ``leading``: the earlier
    behaviour, first T - T / steps).
    """

    def __init__(self, embed_dim: int = 1280, num_layers: int = 6, num_heads: int = 24, head_dim: int = 52,
                 timesteps: int = 100, cond_drop_prob: float = 0.2, sample_steps: int = 30,
                 guidance_scale: float = 1.5, dropout: float = 0.0,
                 timestep_spacing: Literal["trailing", "leading"] = "trailing"):
        # imported here, not at the top: a command that never builds a prior (``--help``) saves 1 s of start-up
        from diffusers import DDIMScheduler, DDPMScheduler, PriorTransformer

        super().__init__()
        self.embed_dim, self.cond_drop_prob = embed_dim, cond_drop_prob
        self.sample_steps, self.guidance_scale = sample_steps, guidance_scale

        self.transformer = PriorTransformer(
            num_attention_heads=num_heads, attention_head_dim=head_dim, num_layers=num_layers,
            embedding_dim=embed_dim, num_embeddings=0, additional_embeddings=4, dropout=dropout,
            encoder_hid_proj_type=None, added_emb_type="prd")
        # PriorTransformer's clip_mean / clip_std only serve its post_process_latents, which this prior does not
        # use: frozen, so that DDP sees no parameter without a gradient.
        self.transformer.clip_mean.requires_grad_(False)
        self.transformer.clip_std.requires_grad_(False)
        self.null_condition = nn.Parameter(torch.zeros(embed_dim))
        scheduler_config = dict(num_train_timesteps=timesteps, beta_schedule="squaredcos_cap_v2",
                                prediction_type="sample", clip_sample=False)
        self.train_scheduler = DDPMScheduler(**scheduler_config)
        self.sample_scheduler = DDIMScheduler(**scheduler_config, timestep_spacing=timestep_spacing)

    def predict_x0(self, noisy: torch.Tensor, timesteps: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        return self.transformer(noisy, timesteps, proj_embedding=condition).predicted_image_embedding

    def loss(self, condition: torch.Tensor, target: torch.Tensor,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Training loss: MSE of the x0 prediction at a random timestep, with condition dropout.
        (B, D), (B, D) -> (scalar loss, (B, D) x0 prediction)."""
        batch = target.shape[0]
        t = torch.randint(0, self.train_scheduler.config.num_train_timesteps, (batch,), device=target.device)
        noise = torch.randn_like(target)
        noisy = self.train_scheduler.add_noise(target, noise, t)
        if self.training and self.cond_drop_prob > 0:
            drop = torch.rand(batch, device=target.device) < self.cond_drop_prob
            condition = torch.where(drop[:, None], self.null_condition.to(condition.dtype), condition)
        pred = self.predict_x0(noisy, t, condition)
        return F.mse_loss(pred, target), pred

    @torch.no_grad()
    def sample(self, condition: torch.Tensor, generator: torch.Generator | None = None,
               steps: int | None = None, guidance_scale: float | None = None,
               noise: torch.Tensor | None = None) -> torch.Tensor:
        """DDIM sampling with classifier-free guidance, (B, D) -> (B, D). The start noise is ``noise`` (broadcast to
        (B, D); stage 2 gives every sample the same fixed noise) or drawn from ``generator``."""
        return self.sample_with_grad(condition, generator, steps, guidance_scale, noise)

    def sample_with_grad(self, condition: torch.Tensor, generator: torch.Generator | None = None,
                         steps: int | None = None, guidance_scale: float | None = None,
                         noise: torch.Tensor | None = None) -> torch.Tensor:
        """Like ``sample`` but inside autograd (gradients reach ``condition``)."""
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        scheduler = type(self.sample_scheduler).from_config(self.sample_scheduler.config)
        scheduler.set_timesteps(steps or self.sample_steps, device=condition.device)
        if noise is not None:
            x = noise.to(condition.device, condition.dtype).expand_as(condition)
        else:
            # on the generator's device (a CPU generator: the same noise on every device), else the condition's
            draw_on = generator.device if generator is not None else condition.device
            x = torch.randn(condition.shape, generator=generator, device=draw_on, dtype=condition.dtype)
            x = x.to(condition.device)
        null = self.null_condition.to(condition.dtype).expand_as(condition)
        for t in scheduler.timesteps:
            tt = t.expand(condition.shape[0]).to(condition.device)
            if scale != 1.0:
                both = self.predict_x0(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([condition, null]))
                cond, uncond = both.chunk(2)
                pred = uncond + scale * (cond - uncond)
            else:
                pred = self.predict_x0(x, tt, condition)
            x = scheduler.step(pred, t, x, eta=0.0).prev_sample
        return x
