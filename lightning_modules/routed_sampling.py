"""Stage 2's generation: the denoising loop (routers re-run at every step, classifier-free guidance), the initial
noise of every image, the decoding, and the prediction record.

Expert embeddings (and any prior outputs) are computed once per image before the loop; each step only re-runs the
spatial and temporal routers on the current latent and timestep, the projections and the UNet.
"""

from __future__ import annotations

from typing import Literal

import torch

from datamodules.shard_format import subject_name
from lightning_modules.components.guidance import guide, guided_batch
from lightning_modules.run_records import attached_datamodule

SamplerName = Literal["euler", "ddim", "dpm"]
SAMPLERS = {"euler": "EulerDiscreteScheduler", "ddim": "DDIMScheduler", "dpm": "DPMSolverMultistepScheduler"}


def make_scheduler(name: SamplerName, config: dict):
    import diffusers

    if name not in SAMPLERS:
        raise ValueError(f"model.sampler {name!r}: choose one of {sorted(SAMPLERS)}")
    return getattr(diffusers, SAMPLERS[name]).from_config(config)


@torch.no_grad()
def sample_latents(module, noise: torch.Tensor, experts: dict[str, list[torch.Tensor]], sampler: SamplerName,
                   steps: int, guidance_scale: float, record_routing: bool = True
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(n, C, h, w) unit noise -> denoised latents (n, C, h, w) and the routing of every step.

    ``module`` is a ``RoutedDiffusionModule`` (its ``route``, ``unconditional`` and ``unet_eps``). Deterministic
    samplers only (no noise is drawn inside the loop), so an image depends only on its initial noise."""
    scheduler = make_scheduler(sampler, module.scheduler_config)
    scheduler.set_timesteps(steps, device=noise.device)
    latents = noise * scheduler.init_noise_sigma
    n = len(latents)
    record: dict[str, list[torch.Tensor]] = {}
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, t)
        timesteps = t.expand(n).to(noise.device)
        prompt, pooled, injection, routing = module.route(model_input, timesteps, experts)
        if guidance_scale != 1.0:
            prompt, pooled = guided_batch(prompt, pooled, injection, module.unconditional(injection, n, noise.device))
            eps_uncond, eps_cond = module.unet_eps(torch.cat([model_input, model_input]),
                                                   torch.cat([timesteps, timesteps]), prompt, pooled,
                                                   injection).chunk(2)
            eps = guide(eps_uncond, eps_cond, guidance_scale)
        else:
            eps = module.unet_eps(model_input, timesteps, prompt, pooled, injection)
        latents = scheduler.step(eps, t, latents).prev_sample
        if record_routing:
            for branch, r in routing.items():
                record.setdefault(f"{branch}_level_weights", []).append(r.level_weights.float().cpu())
                for level, m in enumerate(r.spatial_maps or []):
                    record.setdefault(f"{branch}_spatial_level{level}", []).append(m.float().cpu())
    routing_out = {k: torch.stack(v) for k, v in record.items()}
    if record_routing:
        routing_out["timesteps"] = scheduler.timesteps.float().cpu()
    return latents, routing_out


def image_noise(subject: str, ids: torch.Tensor, shape: tuple[int, ...], salt: int) -> torch.Tensor:
    """Noise (b, *shape) that depends only on (seed, subject, nsd_id, salt), whatever the batching."""
    base = int(subject_name(subject)[4:]) * 1_000_003 + salt * 7919
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(base + int(i) * 31 + 17))
                        for i in ids.tolist()])


def decode_images(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents (n, 4, h, w) -> images (n, 3, H, W) in [0, 1]."""
    decoded = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return ((decoded.float() + 1) / 2).clamp(0, 1)


@torch.no_grad()
def reconstruct(module, experts: dict[str, list[torch.Tensor]], subject: str, nsd_ids: torch.Tensor,
                steps: int | None = None, guidance_scale: float | None = None, record_routing: bool = True
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``RoutedDiffusionModule.reconstruct``: initial noise by (seed, subject, nsd_id), the guided denoising loop
    (``sample_latents``) and the VAE decoding, at ``model.resolution`` or the stored image size."""
    h = module.hparams
    size = h.resolution or stored_image_size(attached_datamodule(module))
    shape = (module.unet.config.in_channels, size // module.vae_factor, size // module.vae_factor)
    noise = image_noise(subject, nsd_ids, shape, h.seed * 101 + 50_000).to(module.device)
    latents, routing = sample_latents(module, noise, experts, h.sampler, steps or h.inference_steps,
                                      h.guidance_scale if guidance_scale is None else guidance_scale,
                                      record_routing)
    return decode_images(module.vae, latents), routing


def stored_image_size(dm) -> int:
    """The stored image size in pixels that a set-up data module tells."""
    if dm is not None and getattr(dm, "metas", None):
        return int(next(iter(dm.metas.values()))["image_size"])
    raise ValueError("model.resolution is unset and no data module tells the stored image size: set it")


def predict_record(module, batch: dict, done: set[int]) -> dict:
    """``RoutedDiffusionModule.predict_step``: the batch's valid images whose nsd_id is not in ``done`` (uint8,
    (n, 3, H, W)) and their routing; the whole valid batch is reconstructed (same composition, same images)."""
    subject = batch["subject"]
    valid = batch["valid"].cpu()
    missing = torch.tensor([bool(v) and int(i) not in done for v, i in zip(valid, batch["nsd_id"])],
                           dtype=torch.bool)
    record: dict = {"subject": subject, "nsd_id": batch["nsd_id"][missing].cpu()}
    if not missing.any():
        return record
    sub = {k: (v[valid.to(v.device)] if isinstance(v, torch.Tensor) and len(v) == len(valid) else v)
           for k, v in batch.items()}
    experts = module.expert_embeddings(sub, subject)
    images, routing = module.reconstruct(experts, subject, sub["nsd_id"].cpu())
    keep = missing[valid]
    record["images"] = (images[keep] * 255).round().to(torch.uint8).cpu()
    record["routing"] = {k: (v if k == "timesteps" else v[:, keep]).cpu() for k, v in routing.items()}
    return record
