"""Stage-2 training-step overhead on CPU: our routed, regional conditioning against stock IP-Adapter + LoRA.

Both sides train the same tiny SDXL-shaped UNet (``tiny_models.make_tiny_sdxl``: cross-attention at 16 x 16 and
8 x 8, 64-wide) with the same LoRA (r 4 on to_q/k/v/out.0 and the feed-forward linears), on 16 x 16 latents
(64 px) and PRECOMPUTED expert embeddings (random (B, E_l, 32) for E_l in 2, 4, 8, 16: no stage-1 encoder, no
prior, no VAE). One step = noise + forward + min-SNR epsilon loss + backward + AdamW over the trained parameters.

- ours: image and text ``RoutedBranch`` (soft temporal + spatial, grid 4), ``ImageTokenProjection`` (4 tokens per
  routed token: 16 x 4 = 64 IP tokens), ``BrainPrompt`` (reference), our processors with regional masks for the IP
  tokens and the prompt, plus the level KL term. The conditioning is ``RoutedDiffusionModule``'s own ``route`` /
  ``unet_eps`` / ``diffusion_loss`` / ``kl_terms`` methods, run on a light stand-in holding the same components
  (the real module needs stage-1 checkpoints).
- baseline: diffusers' ``IPAdapterAttnProcessor2_0`` (num_tokens (64,)) fed by diffusers' ``ImageProjection``
  (Linear + LayerNorm, 64 tokens) of the level-averaged image embedding through the UNet's ``encoder_hid_proj``;
  prompt = ``BrainPrompt`` of the level-averaged text embedding; no routers, no masks.

The two are timed in one process, interleaved (alternating which goes first), after a warm-up; medians are
reported. Also: prior transformer passes per reconstructed image, the reference's against ours, from the configs.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml
from torch import nn

from lightning_modules.components.brain_prompt import BrainPrompt
from lightning_modules.components.diffusion_loss import min_snr_weights, weighted_mse
from lightning_modules.components.injection import ImageTokenProjection, install_processors
from lightning_modules.components.routed_branch import BranchSpec, RoutedBranch
from lightning_modules.sdxl_loading import LORA_TARGETS, add_lora

ROOT = Path(__file__).resolve().parents[2]
PAPER_CONFIG = ROOT / "configs" / "stage2" / "sdxl_nsd.yaml"
STAGE1_CONFIG = ROOT / "configs" / "stage1" / "image_nsd.yaml"
# reference-morebrain.md section 5.8: inside every one of the 50 denoising steps, each branch's routed embedding is
# sampled through the prior with DDIM 30 steps and classifier-free guidance (two passes per step)
REFERENCE_PRIOR = {"denoising_steps": 50, "prior_ddim_steps": 30, "prior_cfg_passes": 2}


def _stand_in():
    """A plain ``nn.Module`` class that borrows ``RoutedDiffusionModule``'s conditioning methods."""
    from lightning_modules.routed_diffusion import RoutedDiffusionModule as M

    class RoutedCore(nn.Module):
        route, unet_eps, time_ids, time_embedding, unet_dtype = (M.route, M.unet_eps, M.time_ids, M.time_embedding,
                                                                 M.unet_dtype)
        diffusion_loss, kl_terms, unconditional = M.diffusion_loss, M.kl_terms, M.unconditional

    return RoutedCore


def build_routed(unet: nn.Module, scheduler_config: dict, prompts: dict[str, torch.Tensor], vae_factor: int,
                 embed_dim: int, num_experts: list[int], image_branch: BranchSpec, text_branch: BranchSpec,
                 lora_rank: int, lora_alpha: int, ip_tokens: int, ip_adapter_loaded: bool = False,
                 lora_targets: tuple[str, ...] = LORA_TARGETS, seed: int = 0) -> nn.Module:
    """``RoutedDiffusionModule``'s trained stack on a frozen ``unet``, in the module's order: our processors
    (``install_processors``), the peft LoRA, one ``RoutedBranch`` per branch, ``ImageTokenProjection`` and
    ``BrainPrompt``, made trainable by ``stage2_parts`` exactly as the module does (``ip_adapter_loaded``: the IP
    key / value weights and projection stay frozen, as with the paper's IP-Adapter file). Returns the light
    stand-in holding them with the module's conditioning methods (``route``, ``unet_eps``, ``diffusion_loss``,
    ``kl_terms``, ``unconditional``). ``prompts``: ``sos_embeds`` (S, C), ``sos_pooled`` (P,) and the fixed prompt
    buffers ``{negative,empty}_prompt_embeds`` (S, C) / ``{negative,empty}_pooled`` (P,)."""
    from lightning_modules import stage2_parts
    from lightning_modules.sdxl_loading import training_scheduler

    scheduler = training_scheduler(scheduler_config)
    cross_dim = unet.config.cross_attention_dim
    time_dim, channels = unet.time_proj.num_channels, unet.config.in_channels
    torch.manual_seed(seed)
    processors = install_processors(unet)
    torch.manual_seed(seed + 1)
    add_lora(unet, lora_rank, lora_alpha, lora_targets, "gaussian")
    ours = _stand_in()()
    ours.unet, ours.grid, ours.vae_factor = unet, stage2_parts.regional_grid(image_branch, text_branch), vae_factor
    ours.noise_scheduler, ours.num_train_timesteps = scheduler, scheduler.config.num_train_timesteps
    ours.scheduler_config = dict(scheduler_config)
    ours.register_buffer("alphas_cumprod", scheduler.alphas_cumprod.clone(), persistent=False)
    ours.hparams = SimpleNamespace(ip_scale=1.0, snr_gamma=1.5, kl_weight=0.1, kl_sigma=1.0, kl_t_lo=0.0,
                                   kl_t_hi=None, kl_direction="coarse_first")
    torch.manual_seed(seed + 2)
    ours.image_router = RoutedBranch(image_branch, embed_dim, num_experts, time_dim, channels)
    ours.text_router = RoutedBranch(text_branch, embed_dim, num_experts, time_dim, channels)
    ours.image_projection = ImageTokenProjection(embed_dim, cross_dim, ip_tokens)
    ours.image_encoder = SimpleNamespace(embed_dim=embed_dim)  # what ``unconditional`` reads of the encoder
    sos = prompts["sos_embeds"]
    ours.brain_prompt = BrainPrompt(embed_dim, cross_dim, prompts["sos_pooled"].shape[-1], sos[0], sos.shape[0])
    for name in ("negative_prompt_embeds", "negative_pooled", "empty_prompt_embeds", "empty_pooled"):
        ours.register_buffer(name, prompts[name], persistent=False)
    parts = stage2_parts.stage2_parts(unet, (ours.image_router, ours.text_router), ours.image_projection,
                                      ours.brain_prompt, processors, ip_adapter_loaded)
    trained, stored = stage2_parts.trained_and_stored(True, ip_adapter_loaded, None, None)
    stage2_parts.apply_trainable(parts, trained, stored)
    return ours


def build_models(directory: Path, embed_dim: int, num_experts: list[int], lora_rank: int, ip_tokens: int,
                 grid: int = 4) -> tuple[nn.Module, nn.Module, dict]:
    """(ours, baseline, shared buffers) on the tiny UNet of ``directory`` (a ``make_tiny_sdxl`` output)."""
    from diffusers import DDPMScheduler
    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection

    from lightning_modules.sdxl_loading import encode_prompt, load_sdxl

    parts = load_sdxl(directory)
    sos_embeds, pooled = encode_prompt(parts, "a cat on a shelf")
    empty_embeds, empty_pooled = encode_prompt(parts, "")
    scheduler = DDPMScheduler.from_config(parts.scheduler_config)
    vae_factor = 2 ** (len(parts.vae.config.block_out_channels) - 1)

    def lora(unet):
        add_lora(unet, lora_rank, lora_rank, LORA_TARGETS, "gaussian")

    cross_dim = parts.unet.config.cross_attention_dim
    spec = BranchSpec(temporal="soft", spatial=True, grid=grid, regional=True, source="clip", pool="mean",
                      query_dim=32, spatial_dim=32)

    def prompt():
        return BrainPrompt(embed_dim, cross_dim, pooled.shape[-1], sos_embeds[0], sos_embeds.shape[0])

    # ours: the module's order (processors, then LoRA); the IP key / value weights trainable after add_adapter,
    # which otherwise freezes them (peft keeps only lora_ parameters trainable inside the UNet)
    prompts = {"sos_embeds": sos_embeds, "sos_pooled": pooled, "empty_prompt_embeds": empty_embeds,
               "empty_pooled": empty_pooled, "negative_prompt_embeds": empty_embeds, "negative_pooled": empty_pooled}
    ours = build_routed(load_sdxl(directory).unet.requires_grad_(False), parts.scheduler_config, prompts,
                        vae_factor, embed_dim, num_experts, spec, spec, lora_rank, lora_rank, ip_tokens)

    # baseline: the same UNet weights and LoRA, stock IP-Adapter processors and projection
    base_unet = load_sdxl(directory).unet.requires_grad_(False)
    tokens = (grid**2) * ip_tokens
    procs = {}
    for name in base_unet.attn_processors:
        if name.endswith("attn1.processor"):
            procs[name] = AttnProcessor2_0()
        else:
            attn = base_unet.get_submodule(name[: -len(".processor")])
            procs[name] = IPAdapterAttnProcessor2_0(attn.to_out[0].out_features, cross_dim, num_tokens=(tokens,))
    base_unet.set_attn_processor(procs)
    base_unet.encoder_hid_proj = MultiIPAdapterImageProjection([ImageProjection(embed_dim, cross_dim, tokens)])
    base_unet.config.encoder_hid_dim_type = "ip_image_proj"
    torch.manual_seed(1)
    lora(base_unet)
    for module in base_unet.attn_processors.values():
        if isinstance(module, nn.Module):
            module.requires_grad_(True)
    base_unet.encoder_hid_proj.requires_grad_(True)
    baseline = nn.Module()
    baseline.unet, baseline.prompt = base_unet, prompt()
    baseline.register_buffer("alphas_cumprod", scheduler.alphas_cumprod.clone(), persistent=False)
    return ours, baseline, {"scheduler": scheduler, "vae_factor": vae_factor}


def routed_step(ours: nn.Module, optimizer: torch.optim.Optimizer, latents: torch.Tensor,
                experts: dict[str, list[torch.Tensor]], generator: torch.Generator) -> float:
    """One training step of ``build_routed``'s stand-in on latents (B, 4, h, w) and expert embeddings
    {branch: [(B, E_l, D)]}: noise and timesteps drawn from ``generator`` (on the latents' device), the min-SNR
    epsilon loss plus the level KL terms, backward, ``optimizer.step``; returns the loss (a host sync)."""
    batch, device = latents.shape[0], latents.device
    noise = torch.randn(latents.shape, generator=generator, device=device)
    t = torch.randint(0, ours.num_train_timesteps, (batch,), generator=generator, device=device)
    loss, routing, _ = ours.diffusion_loss(latents, experts, t, noise)
    kl = ours.kl_terms(routing, t)
    total = loss + ours.hparams.kl_weight * sum(kl.values())
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    return float(total.detach())


def make_steps(ours: nn.Module, baseline: nn.Module, scheduler, batch: int, latent: int, embed_dim: int,
               num_experts: list[int], vae_factor: int, seed: int = 0
               ) -> tuple[Callable[[], float], Callable[[], float]]:
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, latent, latent, generator=g)
    experts = {b: [torch.randn(batch, e, embed_dim, generator=g) for e in num_experts] for b in ("image", "text")}
    size = latent * vae_factor  # the baseline's time ids say the pixel size, as ``RoutedDiffusionModule.time_ids``
    time_ids = torch.tensor([size, size, 0, 0, size, size], dtype=torch.float32)
    time_ids = time_ids.expand(batch, -1)
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-4)
    opt_base = torch.optim.AdamW([p for p in baseline.parameters() if p.requires_grad], lr=1e-4)

    def draw():
        return torch.randn(latents.shape, generator=g), torch.randint(0, 1000, (batch,), generator=g)

    def ours_step() -> float:
        return routed_step(ours, opt_ours, latents, experts, g)

    def baseline_step() -> float:
        noise, t = draw()
        noisy = scheduler.add_noise(latents, noise, t)
        image = torch.stack([x.mean(1) for x in experts["image"]], 1).mean(1)  # level average (B, D)
        text = torch.stack([x.mean(1) for x in experts["text"]], 1).mean(1)
        prompt, pooled, _ = baseline.prompt(text[:, None])
        pred = baseline.unet(noisy, t, encoder_hidden_states=prompt,
                             added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids,
                                                "image_embeds": [image[:, None]]}).sample
        loss = weighted_mse(pred, noise, min_snr_weights(baseline.alphas_cumprod, t, 1.5))
        opt_base.zero_grad(set_to_none=True)
        loss.backward()
        opt_base.step()
        return float(loss.detach())

    return ours_step, baseline_step


def time_interleaved(fns: dict[str, Callable[[], float]], repeats: int, warmup: int) -> dict[str, list[float]]:
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times = {name: [] for name in names}
    for i in range(repeats):
        for name in (names if i % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def prior_passes(config: Path = PAPER_CONFIG, stage1_config: Path = STAGE1_CONFIG) -> dict:
    """Prior transformer passes per reconstructed image and branch: the reference (inside every denoising step)
    against ours (once per image, all experts batched), from the configs' values."""
    model = yaml.safe_load(Path(config).read_text())["model"]["init_args"]
    moe = yaml.safe_load(Path(stage1_config).read_text())["model"]["init_args"]["moe"].get("init_args", {})
    levels, first, factor = moe.get("num_levels", 4), moe.get("num_experts_0", 2), moe.get("factor", 2)
    experts = [first * factor**level for level in range(levels)]
    steps, guidance = int(model["prior_steps"]), model.get("prior_guidance")
    guidance = 1.5 if guidance is None else float(guidance)  # None: the prior's default guidance, 1.5
    cfg = 2 if guidance != 1.0 else 1
    ref = REFERENCE_PRIOR
    reference = ref["denoising_steps"] * ref["prior_ddim_steps"] * ref["prior_cfg_passes"]
    return {
        "config": str(Path(config).relative_to(ROOT)) if Path(config).is_relative_to(ROOT) else str(config),
        "reference": {**ref, "passes_per_branch": reference,
                      "rows_per_branch": reference, "note": "one routed embedding per pass (reference 5.8)"},
        "ours": {"prior_steps": steps, "prior_guidance": guidance, "experts": sum(experts),
                 "batched_calls_per_branch": steps, "rows_per_call": sum(experts) * cfg,
                 "rows_per_branch": sum(experts) * steps * cfg,
                 "note": "once per image before the denoising loop; every expert and both CFG halves in one call"},
        "sequential_calls_ratio": round(reference / steps, 1),
        "rows_ratio": round(reference / (sum(experts) * steps * cfg), 2),
    }


def run(batch: int = 8, latent: int = 16, repeats: int = 30, warmup: int = 3, threads: int = 2,
        lora_rank: int = 4, ip_tokens: int = 4, grid: int = 4, embed_dim: int = 32,
        num_experts: tuple[int, ...] = (2, 4, 8, 16), models_dir: str | Path | None = None) -> dict:
    """Time both training steps; ``models_dir``: an existing ``make_tiny_sdxl`` directory (else one is written to
    a temporary directory)."""
    from experiments.world.tiny_models import make_tiny_clip, make_tiny_sdxl

    num_experts, previous_threads = list(num_experts), torch.get_num_threads()
    load_before = round(os.getloadavg()[0], 2)
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(models_dir) if models_dir else make_tiny_sdxl(make_tiny_clip(tmp, embed_dim=embed_dim))
            ours, baseline, shared = build_models(directory, embed_dim, num_experts, lora_rank, ip_tokens, grid)
        ours_step, baseline_step = make_steps(ours, baseline, shared["scheduler"], batch, latent, embed_dim,
                                              num_experts, shared["vae_factor"])
        times = time_interleaved({"ours": ours_step, "baseline": baseline_step}, repeats, warmup)
    finally:
        torch.set_num_threads(previous_threads)
    ours_ms = statistics.median(times["ours"]) * 1e3
    base_ms = statistics.median(times["baseline"]) * 1e3

    def trainable(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters() if p.requires_grad)

    return {
        "benchmark": "stage2_train_step_routed_vs_ip_adapter",
        "config": {"unet": "tiny_models.make_tiny_sdxl", "batch": batch, "latent": [4, latent, latent],
                   "pixels": latent * shared["vae_factor"], "experts": num_experts, "embed_dim": embed_dim,
                   "lora_rank": lora_rank, "lora_targets": list(LORA_TARGETS), "ip_tokens_per_routed_token": ip_tokens,
                   "ip_tokens_total": (grid**2) * ip_tokens, "grid": grid,
                   "threads": threads, "dtype": "float32", "repeats": repeats, "warmup": warmup,
                   "load_average_1min_before": load_before,
                   "trainable_ours": trainable(ours), "trainable_baseline": trainable(baseline)},
        "ours_ms": round(ours_ms, 2), "baseline_ms": round(base_ms, 2),
        "ours_ms_min": round(min(times["ours"]) * 1e3, 2), "baseline_ms_min": round(min(times["baseline"]) * 1e3, 2),
        "overhead_ratio": round(ours_ms / base_ms, 3), "target_ratio": 1.15,
        "prior_passes_per_image": prior_passes(),
    }
