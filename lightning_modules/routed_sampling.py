"""The denoising loop of stage 2's generation: routers re-run at every step, classifier-free guidance.

Expert embeddings (and any prior outputs) are computed once per image before the loop; each step only re-runs the
spatial and temporal routers on the current latent and timestep, the projections and the UNet.
"""

from __future__ import annotations

from typing import Literal

import torch

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
            neg_prompt, neg_pooled, neg_ip = module.unconditional(injection, n, noise.device)
            prompt, pooled = torch.cat([neg_prompt, prompt.to(neg_prompt.dtype)]), torch.cat([neg_pooled, pooled])
            if injection.ip_tokens is not None:
                injection.ip_tokens = torch.cat([neg_ip, injection.ip_tokens])
            if injection.text_rows is not None:
                injection.text_rows = torch.cat([torch.zeros_like(injection.text_rows), injection.text_rows])
            eps_uncond, eps_cond = module.unet_eps(torch.cat([model_input, model_input]),
                                                   torch.cat([timesteps, timesteps]), prompt, pooled,
                                                   injection).chunk(2)
            eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
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
