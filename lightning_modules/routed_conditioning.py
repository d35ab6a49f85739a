"""Stage 2's routed conditioning, one UNet call and its loss: the methods of ``RoutedDiffusionModule`` that the
training, validation and generation hooks compose (a plain mixin: no hooks, no state of its own).

Per denoising step: ``route`` runs each branch's temporal router (timestep sinusoid -> weights over levels) and
spatial router (noisy latent pooled to a g x g grid -> weights over each level's experts) on the frozen expert
embeddings (``expert_embeddings``), projects the image tokens for the decoupled IP attention and builds the brain
prompt; ``unet_eps`` is the UNet's noise prediction under that ``Injection``; ``diffusion_loss`` the min-SNR
weighted epsilon MSE; ``kl_terms`` the KL guidance of the temporal routers; ``unconditional`` /
``drop_conditions`` classifier-free guidance's negative half (``components.guidance``).

It reads the module's attributes: ``unet``, ``vae``, ``noise_scheduler``, ``alphas_cumprod``, ``num_train_timesteps``,
``vae_factor``, ``grid``, ``hparams``, the ``{image,text}_{encoder,router}``, ``image_projection``, ``brain_prompt``,
``condition_tables`` and the fixed prompt buffers (``sdxl_loading.fixed_prompts``).
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_modules import sdxl_loading
from lightning_modules.components.diffusion_loss import min_snr_weights, per_sample_mse
from lightning_modules.components.guidance import drop_conditions, unconditional
from lightning_modules.components.injection import Injection
from lightning_modules.components.level_prior import kl_terms
from lightning_modules.components.routed_branch import BranchOutput
from lightning_modules.condition_tables import expert_embeddings


class RoutedConditioning:
    """Conditioning, UNet call and losses of ``RoutedDiffusionModule`` (see the module docstring)."""

    @property
    def branches(self) -> list[str]:
        return [b for b in ("image", "text") if getattr(self, f"{b}_router") is not None]

    def expert_embeddings(self, sub: dict[str, Any], subject: str) -> dict[str, list[torch.Tensor]]:
        """One sub-batch's voxels (b, V) or (b, R, V) -> {branch: [(b, E_l, D)]} (frozen, computed once; a
        condition table's rows instead where set, rolled by one under ``shuffle_conditions``)."""
        encoders = {b: getattr(self, f"{b}_encoder") for b in self.branches}
        return expert_embeddings(encoders, self.condition_tables, sub, subject, self.hparams.shuffle_conditions,
                                 self.device)

    def encode_batch(self, batch: dict[str, dict[str, Any]]) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """A training batch {subject: sub-batch} -> latents (B, 4, h, w) and {branch: [(B, E_l, D)]}, subjects
        concatenated in batch order."""
        latents, experts = [], {b: [] for b in self.branches}
        for subject, sub in batch.items():
            latents.append(self.encode_latents(sub))
            for branch, levels in self.expert_embeddings(sub, subject).items():
                experts[branch].append(levels)
        return torch.cat(latents), {b: [torch.cat(level) for level in zip(*parts)] for b, parts in experts.items()}

    def route(self, latents: torch.Tensor, timesteps: torch.Tensor, experts: dict[str, list[torch.Tensor]]
              ) -> tuple[torch.Tensor, torch.Tensor, Injection, dict[str, BranchOutput]]:
        """Noisy latents (B, C, h, w) as the UNet sees them, timesteps (B,), expert embeddings -> prompt embeds
        (B, S, C), pooled (B, P), the ``Injection`` for the processors and every branch's routing."""
        batch = latents.shape[0]
        t_emb = self.time_embedding(timesteps).float()
        injection = Injection(grid=self.grid, latent_hw=tuple(latents.shape[-2:]), ip_scale=self.hparams.ip_scale)
        routing: dict[str, BranchOutput] = {}
        if self.image_router is not None:
            routing["image"] = out = self.image_router(experts["image"], latents, t_emb, timesteps)
            injection.ip_tokens = self.image_projection(out.tokens)
            if self.image_router.spatial is not None and self.image_router.spec.regional:
                injection.ip_cells = torch.arange(out.tokens.shape[1], device=latents.device).repeat_interleave(
                    self.image_projection.num_tokens)
        if self.text_router is not None:
            routing["text"] = out = self.text_router(experts["text"], latents, t_emb, timesteps)
            prompt, pooled, cells = self.brain_prompt(out.tokens)
            if cells is not None and self.text_router.spec.regional:
                injection.text_cells = cells
                injection.text_rows = torch.ones(batch, dtype=torch.bool, device=latents.device)
        else:
            prompt = self.empty_prompt_embeds.expand(batch, -1, -1)
            pooled = self.empty_pooled.expand(batch, -1)
        return prompt, pooled, injection, routing

    def unconditional(self, injection: Injection, batch: int, device: torch.device
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Classifier-free guidance's negative half (``components.guidance.unconditional``): negative prompt, its
        pooled embedding and zero brain image tokens (B, S, C), (B, P), (B, T, C)."""
        embed_dim = self.image_encoder.embed_dim if self.image_projection is not None else None
        return unconditional(self.negative_prompt_embeds, self.negative_pooled, self.image_projection, embed_dim,
                             injection, batch, device)

    def time_embedding(self, timesteps: torch.Tensor) -> torch.Tensor:
        """(T,) timesteps -> (T, time_dim) the UNet's sinusoidal embedding (what the temporal routers see)."""
        sample = torch.zeros(len(timesteps), 1, 1, 1, device=timesteps.device, dtype=self.unet_dtype)
        return self.unet.get_time_embed(sample, timesteps)

    @property
    def unet_dtype(self) -> torch.dtype:
        """The frozen UNet's compute dtype, read off its input convolution: diffusers' ``ModelMixin.dtype`` walks
        every submodule (about 2 ms per call on the tiny UNet, twice a training step)."""
        return self.unet.conv_in.weight.dtype

    def time_ids(self, latents: torch.Tensor) -> torch.Tensor:
        """SDXL's added time ids (original size, crop, target size), truthful: the generated pixel size."""
        h, w = latents.shape[-2] * self.vae_factor, latents.shape[-1] * self.vae_factor
        ids = torch.tensor([h, w, 0, 0, h, w], dtype=torch.float32, device=latents.device)
        return ids.expand(latents.shape[0], -1)

    def unet_eps(self, latents: torch.Tensor, timesteps: torch.Tensor, prompt: torch.Tensor, pooled: torch.Tensor,
                 injection: Injection) -> torch.Tensor:
        dtype = self.unet_dtype
        if injection.ip_tokens is not None:
            injection.ip_tokens = injection.ip_tokens.to(dtype)
        return self.unet(latents.to(dtype), timesteps, encoder_hidden_states=prompt.to(dtype),
                         added_cond_kwargs={"text_embeds": pooled.to(dtype), "time_ids": self.time_ids(latents)
                                            .to(dtype)},
                         cross_attention_kwargs={"injection": injection}).sample.float()

    def target_size(self, images: torch.Tensor) -> tuple[int, int]:
        r = self.hparams.resolution
        return (r, r) if r else tuple(images.shape[-2:])

    @torch.no_grad()
    def encode_latents(self, sub: dict[str, Any], sample: bool = True) -> torch.Tensor:
        """Images (b, 3, H, W) in [0, 1] (or a cached latent distribution) -> scaled latents (b, 4, h, w)."""
        size = self.target_size(sub["image"]) if not self.hparams.latents_key else None
        return sdxl_loading.encode_latents(self.vae, sub, self.hparams.latents_key, size, sample)

    def kl_terms(self, routing: dict[str, BranchOutput], timesteps: torch.Tensor) -> dict[str, torch.Tensor]:
        """KL(temporal router || Gaussian over levels) per branch (``components.level_prior.kl_terms``)."""
        h = self.hparams
        return kl_terms({b: r.router_probs for b, r in routing.items()}, timesteps, h.kl_sigma, h.kl_t_lo, h.kl_t_hi,
                        h.kl_direction, self.num_train_timesteps)

    def drop_conditions(self, drop: torch.Tensor, prompt: torch.Tensor, pooled: torch.Tensor, injection: Injection
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``drop`` (B,) bool get classifier-free guidance's negative half: prompt (B, S, C), pooled (B, P)
        and the injection's image tokens replaced in place; returns the new prompt and pooled embeddings."""
        return drop_conditions(drop, prompt, pooled, injection, self.unconditional(injection, len(drop), drop.device))

    def diffusion_loss(self, latents: torch.Tensor, experts: dict[str, list[torch.Tensor]],
                       timesteps: torch.Tensor, noise: torch.Tensor, drop: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """-> (weighted epsilon MSE, routing, per-sample unweighted MSE); ``drop`` (B,) bool: rows trained on the
        unconditional half (``condition_dropout``)."""
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        prompt, pooled, injection, routing = self.route(noisy, timesteps, experts)
        if drop is not None and bool(drop.any()):
            prompt, pooled = self.drop_conditions(drop, prompt, pooled, injection)
        pred = self.unet_eps(noisy, timesteps, prompt, pooled, injection)
        weights = min_snr_weights(self.alphas_cumprod, timesteps, self.hparams.snr_gamma)
        per_sample = per_sample_mse(pred, noise)
        return (per_sample * weights).mean(), routing, per_sample
