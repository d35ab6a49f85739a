"""Stage 2 LightningModule: SDXL conditioned on frozen stage-1 experts through temporal and spatial routers.

Per sample, once: voxels -> frozen stage-1 encoder -> per-level expert embeddings [(B, E_l, D)] (optionally each
through the frozen stage-1 prior). Per denoising step: spatial router (noisy latent pooled to a g x g grid ->
weights over each level's experts, (B, G, E_l)), temporal router (timestep sinusoid -> weights over levels,
(B, L)) -> tokens (B, G or 1, D) per branch. Image tokens are projected to the cross-attention width and attended
through decoupled (IP-Adapter style, optionally regional) attention in every cross-attention layer; text tokens
become the prompt embeddings. Trained: UNet LoRA (peft), routers, projections, IP key/value and image projection
(unless loaded from IP-Adapter weights; ``lightning_modules.stage2_parts`` is the one definition); everything else is frozen by ``requires_grad_(False)``, never by ``torch.no_grad`` around a
trained path. Checkpoints hold only the trained parameters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable
from torchmetrics import MeanMetric

from datamodules.provenance import provenance
from datamodules.shard_format import FORMAT_VERSION, subject_name
from lightning_modules.checkpoint_files import load_checkpoint_data
from lightning_modules.components.brain_prompt import BrainPrompt, PooledMode, PromptMode
from lightning_modules.components.diffusion_loss import min_snr_weights, per_sample_mse
from lightning_modules.components.injection import (
    ImageTokenProjection,
    Injection,
    install_processors,
    load_ip_adapter_weights,
)
from lightning_modules.components.level_prior import KLDirection, gaussian_level_target, level_kl
from lightning_modules.components.routed_branch import BranchOutput, BranchSpec, RoutedBranch
from lightning_modules.condition_tables import ConditionTable
from lightning_modules.routed_sampling import SamplerName, sample_latents
from lightning_modules.run_records import write_run_record
from lightning_modules.sdxl_loading import DTYPES, encode_prompt, load_sdxl
from lightning_modules.stage1_conditions import FrozenStage1
from lightning_modules.stage2_parts import (  # noqa: F401 - PARTS: importable from here as before
    PARTS,
    Stage2Part,
    apply_trainable,
    stage2_parts,
    trained_and_stored,
)

REFERENCE_NEGATIVE = ("low quality, blurry, deformed, bad anatomy, disfigured, poorly drawn, mutated, extra limbs")
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]


class RoutedDiffusionModule(L.LightningModule):
    """MoRE-Brain stage 2.

    Args:
        sdxl_dir: local SDXL directory (diffusers layout); image_encoder / text_encoder: stage-1 checkpoints of
            the branches; image_branch / text_branch: their routing (``BranchSpec``; null = branch off).
        num_voxels: linked from the data by the CLI; every data subject must be known to the encoders.
        prior_steps / prior_guidance / prior_seed: the deterministic prior sampler (branches with source prior).
        repeat_average: how evaluation repeats are averaged (``embeddings`` before the prior, or ``input``).
        ip_tokens: tokens per routed image token (4 = IP-Adapter SDXL); ip_scale: weight of the image attention;
        ip_adapter_weights: IP-Adapter file to start from; ip_adapter_trainable: train its image projection and key /
            value weights (default: only when not loaded; loaded and not trainable, both stay as loaded).
        prompt_mode / pooled_text / sos_prompt: text branch prompt construction (``BrainPrompt``).
        lora_rank / lora_alpha / lora_targets / lora_init: UNet LoRA (peft).
        resolution: training and generation size in pixels (default: the stored image size); time_ids say it.
        latents_key: name of a joined VAE-latent cache in the batch (``experiments.cache_latents``); default:
            encode images with the VAE ([-1, 1] input, the VAE's scaling factor).
        snr_gamma: min-SNR-gamma weighting (None: plain MSE); noise_offset: offset noise.
        kl_weight / kl_sigma / kl_t_lo / kl_t_hi / kl_direction: KL(temporal router || Gaussian over levels).
        lr / weight_decay / warmup_steps / lr_scheduler: AdamW, constant with linear warmup unless given.
        frozen_dtype: dtype of the frozen UNet and stage-1 encoders (trained parameters stay float32).
        gradient_checkpointing: UNet activation checkpointing.
        val_timesteps / val_seed: validation diffusion loss at these timesteps with noise seeded per image
            (reconstructions of a probe set during validation: ``callbacks.reconstruction_grid``).
        sampler / inference_steps / guidance_scale / negative_prompt / seed: generation (``predict``); the initial
            noise of an image depends only on (seed, subject, nsd_id).
        init_from: a stage-2 checkpoint to start from (new-subject transfer: its LoRA, routers and projections are
            loaded at the start of ``fit``; the new subject's own stage-1 encoders are ``image_encoder`` /
            ``text_encoder``).
        condition_dropout: training only: the probability that a sample's conditions are replaced by classifier-free
            guidance's negative half (negative prompt, zero brain image tokens), so that the guided sampler's
            unconditional branch is in distribution (as the world's IP-Adapter and UNet were trained).
        condition_tables: per branch (``image`` / ``text``), a target cache of fixed embeddings by nsd_id used
            instead of the stage-1 experts (``lightning_modules.condition_tables``): the true targets give the
            ceiling (what a perfect stage 1 would give), a baseline's predictions its row, through the same stage 2.
        shuffle_conditions: a control: every image is conditioned on another image's brain (expert rows rolled by
            one within each batch), the chance level measured on the same data.
        trainable: the parts trained, by module reference (``parts()``): ``lora``, ``routers`` (temporal and
            spatial), ``projections`` (brain prompt, and the image token projection unless loaded from IP-Adapter
            weights) and ``ip_attention`` (IP key / value, and the image projection when loaded from IP-Adapter
            weights: the IP-Adapter file's two halves go together).
            Default: lora, routers, projections, and ip_attention unless loaded from IP-Adapter weights (see
            ip_adapter_trainable). Transfer: ``[routers]`` or ``[routers, projections]``. Checkpoints hold every
            part that is trained by default or here, so a transfer checkpoint is complete on its own.
    """

    def __init__(self, sdxl_dir: str, image_encoder: str | None = None, text_encoder: str | None = None,
                 image_branch: BranchSpec | None = None, text_branch: BranchSpec | None = None,
                 num_voxels: dict[str, int] | None = None, prior_steps: int = 10,
                 prior_guidance: float | None = None, prior_seed: int = 0,
                 repeat_average: Literal["embeddings", "input"] = "embeddings", ip_tokens: int = 4,
                 ip_scale: float = 1.0, ip_adapter_weights: str | None = None,
                 ip_adapter_trainable: bool | None = None, prompt_mode: PromptMode = "reference",
                 pooled_text: PooledMode = "zeros", sos_prompt: str = "a cat on a shelf", lora_rank: int = 16,
                 lora_alpha: int = 16, lora_targets: list[str] | None = None, lora_init: str = "gaussian",
                 resolution: int | None = None, latents_key: str | None = None, snr_gamma: float | None = 1.5,
                 noise_offset: float = 0.0, kl_weight: float = 0.1, kl_sigma: float = 1.0, kl_t_lo: float = 0.0,
                 kl_t_hi: float | None = None, kl_direction: KLDirection = "coarse_first", lr: float = 1e-4,
                 weight_decay: float = 1e-2, warmup_steps: int = 500, lr_scheduler: LRSchedulerCallable | None = None,
                 frozen_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
                 gradient_checkpointing: bool = False, val_timesteps: list[int] | None = None, val_seed: int = 0,
                 sampler: SamplerName = "euler",
                 inference_steps: int = 50, guidance_scale: float = 5.0,
                 negative_prompt: str = REFERENCE_NEGATIVE, seed: int = 0, init_from: str | None = None,
                 trainable: list[Stage2Part] | None = None, condition_dropout: float = 0.0,
                 condition_tables: dict[str, str] | None = None, shuffle_conditions: bool = False):
        super().__init__()
        self.save_hyperparameters(ignore=["lr_scheduler"])
        if image_branch is None and text_branch is None:
            raise ValueError("model.image_branch and model.text_branch are both null: enable at least one")
        self.lr_scheduler_factory = lr_scheduler
        self.run_config: str | None = None
        # checkpoints hold only the trained parameters (the frozen parts come from model.sdxl_dir and the stage-1
        # checkpoints); on_load_checkpoint checks that exactly those are present
        self.strict_loading = False
        parts = load_sdxl(sdxl_dir, "model.sdxl_dir", frozen_dtype)
        self.unet, self.vae = parts.unet, parts.vae
        self.unet.requires_grad_(False)
        self.vae.requires_grad_(False)
        self.unet.train()  # diffusers loads it in eval mode; it trains (LoRA): only the frozen parts stay eval
        self.scheduler_config = dict(parts.scheduler_config)
        from diffusers import DDPMScheduler

        self.noise_scheduler = DDPMScheduler.from_config(self.scheduler_config)
        self.num_train_timesteps = self.noise_scheduler.config.num_train_timesteps
        self.register_buffer("alphas_cumprod", self.noise_scheduler.alphas_cumprod.clone(), persistent=False)
        self.vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        cross_dim = self.unet.config.cross_attention_dim
        time_dim = self.unet.time_proj.num_channels  # the sinusoid width (320 for SDXL's block_out_channels[0])
        latent_channels = self.unet.config.in_channels
        encoder_kw = dict(prior_steps=prior_steps, prior_guidance=prior_guidance, prior_seed=prior_seed,
                          repeat_average=repeat_average)
        grids = {b.grid for b in (image_branch, text_branch) if b is not None and b.spatial and b.regional}
        if len(grids) > 1:
            raise ValueError(f"regional image and text branches need the same grid, got {sorted(grids)}")
        self.grid = grids.pop() if grids else 1

        # registered inside the UNet, not here; without an image branch they hold no IP weights
        self.ip_processors = tuple(install_processors(self.unet, with_ip=image_branch is not None))
        self.image_encoder = self.image_router = self.image_projection = None
        if image_branch is not None:
            self.image_encoder = FrozenStage1(image_encoder, "model.image_encoder", image_branch.source,
                                              **encoder_kw).to(DTYPES[frozen_dtype])
            self.image_router = RoutedBranch(image_branch, self.image_encoder.embed_dim,
                                             self.image_encoder.num_experts, time_dim, latent_channels,
                                             self.num_train_timesteps)
            self.image_projection = ImageTokenProjection(self.image_encoder.embed_dim, cross_dim, ip_tokens)
            if ip_adapter_weights:
                load_ip_adapter_weights(ip_adapter_weights, self.image_projection, self.ip_processors)

        prompt_embeds, pooled = encode_prompt(parts, sos_prompt)
        negative_embeds, negative_pooled = encode_prompt(parts, negative_prompt)
        empty_embeds, empty_pooled = encode_prompt(parts, "")
        self.register_buffer("negative_prompt_embeds", negative_embeds, persistent=False)
        self.register_buffer("negative_pooled", negative_pooled, persistent=False)
        self.register_buffer("empty_prompt_embeds", empty_embeds, persistent=False)
        self.register_buffer("empty_pooled", empty_pooled, persistent=False)
        self.text_encoder = self.text_router = self.brain_prompt = None
        if text_branch is not None:
            self.text_encoder = FrozenStage1(text_encoder, "model.text_encoder", text_branch.source,
                                             **encoder_kw).to(DTYPES[frozen_dtype])
            te2_width = parts.text_encoder_2.config.hidden_size
            if prompt_mode == "reference" and self.text_encoder.embed_dim != te2_width:
                raise ValueError(f"model.text_encoder embeds {self.text_encoder.embed_dim}-d, but prompt_mode "
                                 f"reference needs text encoder 2's width {te2_width}; use prompt_mode projected")
            self.text_router = RoutedBranch(text_branch, self.text_encoder.embed_dim,
                                            self.text_encoder.num_experts, time_dim, latent_channels,
                                            self.num_train_timesteps)
            self.brain_prompt = BrainPrompt(self.text_encoder.embed_dim, cross_dim, pooled.shape[-1],
                                            prompt_embeds[0], prompt_embeds.shape[0], prompt_mode, pooled_text)
        del parts  # text encoders are only needed for the fixed prompts above

        from peft import LoraConfig

        self.unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_alpha, init_lora_weights=lora_init,
                                         target_modules=list(lora_targets or LORA_TARGETS)))
        # after add_adapter: peft leaves only the LoRA weights of the UNet trainable; the parts decide the rest
        # (lightning_modules.stage2_parts: the one definition the parameter report uses too)
        self.trainable, self.stored_parts = trained_and_stored(image_branch is not None, bool(ip_adapter_weights),
                                                               ip_adapter_trainable, trainable)
        apply_trainable(self.parts(), self.trainable, self.stored_parts)
        if not any(p.requires_grad for p in self.parameters()):
            raise ValueError(f"model.trainable {self.trainable} selects no parameters for these branches")
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        if num_voxels:
            for encoder, option in ((self.image_encoder, "model.image_encoder"),
                                    (self.text_encoder, "model.text_encoder")):
                if encoder is not None:
                    encoder.check_subjects(dict(num_voxels), option)
        if not 0.0 <= condition_dropout < 1.0:
            raise ValueError(f"model.condition_dropout must be in [0, 1), got {condition_dropout}")
        self.condition_tables: dict[str, ConditionTable] = {}
        for branch, directory in (condition_tables or {}).items():
            encoder = getattr(self, f"{branch}_encoder", None) if branch in ("image", "text") else None
            if encoder is None:
                raise ValueError(f"model.condition_tables.{branch}: no such branch in this configuration "
                                 f"(branches: {self.branches})")
            spec = image_branch if branch == "image" else text_branch
            self.condition_tables[branch] = ConditionTable(directory, f"model.condition_tables.{branch}",
                                                           encoder.num_experts, encoder.embed_dim, spec.pool)
        self.val_timesteps = list(val_timesteps or [100, 300, 500, 700, 900])
        self.val_loss = MeanMetric()
        self.val_loss_at = torch.nn.ModuleList(MeanMetric() for _ in self.val_timesteps)
        self.skip_ids: dict[str, set[int]] = {}  # predict: images already written (set by the writer callback)

    def parts(self) -> dict[str, list[torch.nn.Module]]:
        """The module groups ``trainable`` names, by reference (``stage2_parts``): LoRA A/B of every peft LoRA
        layer, the branch routers, the token projections and the IP-Adapter (IP key / value, and its image
        projection when loaded from ``ip_adapter_weights``)."""
        return stage2_parts(self.unet, (self.image_router, self.text_router), self.image_projection,
                            self.brain_prompt, self.ip_processors, bool(self.hparams.ip_adapter_weights))

    def stored_names(self) -> set[str]:
        """Parameter names of the parts a checkpoint holds."""
        parts = self.parts()
        ids = {id(p) for name in self.stored_parts for m in parts[name] for p in m.parameters()}
        return {n for n, p in self.named_parameters() if id(p) in ids}

    def parameter_counts(self) -> dict[str, Any]:
        """Parameters per part (params, share of the module's total, trainable) and the trained total."""
        total = sum(p.numel() for p in self.parameters())
        groups = {}
        for name, modules in self.parts().items():
            params = [p for m in modules for p in m.parameters()]
            n = sum(p.numel() for p in params)
            groups[name] = {"params": n, "share": n / max(1, total),
                            "trainable": sum(p.numel() for p in params if p.requires_grad)}
        trained = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"groups": groups, "total": total, "trainable": trained, "trainable_share": trained / max(1, total),
                "trainable_parts": self.trainable}

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.init_from and not getattr(self, "_initialised_from", False):
            self.load_from_stage2(self.hparams.init_from)
            self._initialised_from = True

    def load_from_stage2(self, path: str) -> None:
        """Load the stored parts (LoRA, routers, projections, ...) of another stage-2 checkpoint."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"model.init_from: no checkpoint at {path}")
        state = load_checkpoint_data(path, "model.init_from")["state_dict"]
        expected = self.stored_names()
        missing = sorted(expected - set(state))
        if missing:
            raise ValueError(f"model.init_from {path} lacks {missing[:3]}{'...' if len(missing) > 3 else ''}: "
                             "a different configuration (branches, LoRA targets, IP-Adapter training)?")
        self.load_state_dict({k: state[k] for k in expected}, strict=False)

    def on_fit_start(self) -> None:
        write_run_record(self.trainer, "parameters.json", {**self.parameter_counts(), "provenance": self.provenance()})

    # ------------------------------------------------------------------ conditioning
    def train(self, mode: bool = True):
        """The frozen parts stay in eval mode: the VAE here, the stage-1 encoders in ``FrozenStage1.train``."""
        super().train(mode)
        self.vae.eval()
        return self

    @property
    def branches(self) -> list[str]:
        return [b for b in ("image", "text") if getattr(self, f"{b}_router") is not None]

    def expert_embeddings(self, sub: dict[str, Any], subject: str) -> dict[str, list[torch.Tensor]]:
        """One sub-batch's voxels (b, V) or (b, R, V) -> {branch: [(b, E_l, D)]} (frozen, computed once)."""
        out = {}
        for branch in self.branches:
            if branch in self.condition_tables:
                experts = self.condition_tables[branch].lookup(subject, sub["nsd_id"], self.device)
            else:
                encoder: FrozenStage1 = getattr(self, f"{branch}_encoder")
                experts = encoder(sub["voxels"], subject, sub.get("repeat_mask"))
            if self.hparams.shuffle_conditions:
                if len(experts[0]) < 2:
                    raise ValueError("model.shuffle_conditions needs batches of at least 2 images")
                experts = [x.roll(1, 0) for x in experts]
            out[branch] = [x.float() for x in experts]
        return out

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
        """Classifier-free guidance's negative half: negative prompt, its pooled embedding and zero brain image
        tokens (B, S, C), (B, P), (B, T, C)."""
        ip = None
        if self.image_projection is not None:
            tokens = injection.ip_tokens.shape[1] // self.image_projection.num_tokens
            zeros = torch.zeros(batch, tokens, self.image_encoder.embed_dim, device=device)
            ip = self.image_projection(zeros)
        return (self.negative_prompt_embeds.expand(batch, -1, -1), self.negative_pooled.expand(batch, -1), ip)

    def time_embedding(self, timesteps: torch.Tensor) -> torch.Tensor:
        """(T,) timesteps -> (T, time_dim) the UNet's sinusoidal embedding (what the temporal routers see)."""
        sample = torch.zeros(len(timesteps), 1, 1, 1, device=timesteps.device, dtype=self.unet.dtype)
        return self.unet.get_time_embed(sample, timesteps)

    def time_ids(self, latents: torch.Tensor) -> torch.Tensor:
        """SDXL's added time ids (original size, crop, target size), truthful: the generated pixel size."""
        h, w = latents.shape[-2] * self.vae_factor, latents.shape[-1] * self.vae_factor
        ids = torch.tensor([h, w, 0, 0, h, w], dtype=torch.float32, device=latents.device)
        return ids.expand(latents.shape[0], -1)

    def unet_eps(self, latents: torch.Tensor, timesteps: torch.Tensor, prompt: torch.Tensor, pooled: torch.Tensor,
                 injection: Injection) -> torch.Tensor:
        dtype = self.unet.dtype
        if injection.ip_tokens is not None:
            injection.ip_tokens = injection.ip_tokens.to(dtype)
        return self.unet(latents.to(dtype), timesteps, encoder_hidden_states=prompt.to(dtype),
                         added_cond_kwargs={"text_embeds": pooled.to(dtype), "time_ids": self.time_ids(latents)
                                            .to(dtype)},
                         cross_attention_kwargs={"injection": injection}).sample.float()

    # ------------------------------------------------------------------ latents
    def target_size(self, images: torch.Tensor) -> tuple[int, int]:
        r = self.hparams.resolution
        return (r, r) if r else tuple(images.shape[-2:])

    @torch.no_grad()
    def encode_latents(self, sub: dict[str, Any], sample: bool = True) -> torch.Tensor:
        """Images (b, 3, H, W) in [0, 1] (or a cached latent distribution) -> scaled latents (b, 4, h, w)."""
        key = self.hparams.latents_key
        scale = self.vae.config.scaling_factor
        if key:
            if key not in sub:
                raise KeyError(f"model.latents_key {key!r} is not in the batch: add it to data.targets")
            mean, std = sub[key].float().unbind(1)
            noise = torch.randn_like(mean) if sample else torch.zeros_like(mean)
            return (mean + std * noise) * scale
        images = sub["image"]
        size = self.target_size(images)
        if tuple(images.shape[-2:]) != size:
            images = F.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False)
        dist = self.vae.encode(images.clamp(0, 1).to(self.vae.dtype) * 2 - 1).latent_dist
        return (dist.sample() if sample else dist.mode()).float() * scale

    # ------------------------------------------------------------------ training
    def kl_terms(self, routing: dict[str, BranchOutput], timesteps: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.hparams
        out = {}
        for branch, r in routing.items():
            if r.router_probs is None:
                continue
            target = gaussian_level_target(timesteps, r.router_probs.shape[1], h.kl_sigma, h.kl_t_lo,
                                           h.kl_t_hi if h.kl_t_hi is not None else self.num_train_timesteps,
                                           h.kl_direction, self.num_train_timesteps)
            out[branch] = level_kl(r.router_probs, target)
        return out

    def drop_conditions(self, drop: torch.Tensor, prompt: torch.Tensor, pooled: torch.Tensor, injection: Injection
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``drop`` (B,) bool get classifier-free guidance's negative half: prompt (B, S, C), pooled (B, P)
        and the injection's image tokens replaced in place; returns the new prompt and pooled embeddings."""
        neg_prompt, neg_pooled, neg_ip = self.unconditional(injection, len(drop), drop.device)
        prompt = torch.where(drop[:, None, None], neg_prompt.to(prompt.dtype), prompt)
        pooled = torch.where(drop[:, None], neg_pooled.to(pooled.dtype), pooled)
        if neg_ip is not None:
            injection.ip_tokens = torch.where(drop[:, None, None], neg_ip.to(injection.ip_tokens.dtype),
                                              injection.ip_tokens)
        if injection.text_rows is not None:
            injection.text_rows = injection.text_rows & ~drop
        return prompt, pooled

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

    def training_step(self, batch: dict[str, dict[str, Any]], batch_idx: int) -> torch.Tensor:
        latents, experts = [], {b: [] for b in self.branches}
        for subject, sub in batch.items():
            latents.append(self.encode_latents(sub))
            for branch, levels in self.expert_embeddings(sub, subject).items():
                experts[branch].append(levels)
        latents = torch.cat(latents)
        experts = {b: [torch.cat(level) for level in zip(*parts)] for b, parts in experts.items()}
        noise = torch.randn_like(latents)
        if self.hparams.noise_offset:
            noise = noise + self.hparams.noise_offset * torch.randn(*latents.shape[:2], 1, 1, device=latents.device)
        t = torch.randint(0, self.num_train_timesteps, (len(latents),), device=latents.device)
        drop = (torch.rand(len(latents), device=latents.device) < self.hparams.condition_dropout
                if self.hparams.condition_dropout else None)
        loss, routing, _ = self.diffusion_loss(latents, experts, t, noise, drop)
        kl = self.kl_terms(routing, t)
        total = loss + self.hparams.kl_weight * sum(kl.values()) if kl else loss
        n = len(latents)
        self.log("train/diffusion_loss", loss, batch_size=n)
        for branch, value in kl.items():
            self.log(f"train/kl_{branch}", value, batch_size=n)
        for branch, r in routing.items():
            for level, w in enumerate(r.level_weights.mean(0)):
                self.log(f"train/{branch}_level{level}_weight", w, batch_size=n)
        self.log("train/loss", total, prog_bar=True, batch_size=n)
        return {"loss": total, "routing": routing, "timesteps": t}  # routing: for the statistics callbacks

    # ------------------------------------------------------------------ validation
    def _noise_for(self, subject: str, ids: torch.Tensor, shape: tuple[int, ...], salt: int) -> torch.Tensor:
        """Noise (b, *shape) that depends only on (seed, subject, nsd_id, salt), whatever the batching."""
        base = int(subject_name(subject)[4:]) * 1_000_003 + salt * 7919
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(base + int(i) * 31 + 17))
                            for i in ids.tolist()])

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Diffusion loss at fixed timesteps and fixed noise per image; padding rows get weight 0 (every rank
        updates every metric)."""
        subject, valid = batch["subject"], batch["valid"]
        latents = self.encode_latents(batch, sample=False)
        experts = self.expert_embeddings(batch, subject)
        weight = valid.float()
        for k, t_value in enumerate(self.val_timesteps):
            noise = self._noise_for(subject, batch["nsd_id"], tuple(latents.shape[1:]),
                                    self.hparams.val_seed * 101 + k).to(latents.device)
            t = torch.full((len(latents),), t_value, device=latents.device, dtype=torch.long)
            _, _, per_sample = self.diffusion_loss(latents, experts, t, noise)
            self.val_loss.update(per_sample, weight)
            self.val_loss_at[k].update(per_sample, weight)

    def on_validation_epoch_end(self) -> None:
        self.log("val/diffusion_loss", self.val_loss.compute(), sync_dist=False)
        self.val_loss.reset()
        for t_value, metric in zip(self.val_timesteps, self.val_loss_at):
            self.log(f"val/diffusion_loss_t{t_value}", metric.compute(), sync_dist=False)
            metric.reset()

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def reconstruct(self, experts: dict[str, list[torch.Tensor]], subject: str, nsd_ids: torch.Tensor,
                    steps: int | None = None, guidance_scale: float | None = None, record_routing: bool = True
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Expert embeddings of n images -> images (n, 3, H, W) in [0, 1] and the routing of every denoising
        step: ``{branch}_level_weights`` (steps, n, L), ``{branch}_spatial_level{l}`` (steps, n, G, E_l)."""
        h = self.hparams
        size = h.resolution or self._stored_size()
        shape = (self.unet.config.in_channels, size // self.vae_factor, size // self.vae_factor)
        noise = self._noise_for(subject, nsd_ids, shape, h.seed * 101 + 50_000).to(self.device)
        latents, routing = sample_latents(self, noise, experts, h.sampler, steps or h.inference_steps,
                                          h.guidance_scale if guidance_scale is None else guidance_scale,
                                          record_routing)
        decoded = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return ((decoded.float() + 1) / 2).clamp(0, 1), routing

    def _stored_size(self) -> int:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and getattr(dm, "metas", None):
            return int(next(iter(dm.metas.values()))["image_size"])
        raise ValueError("model.resolution is unset and no data module tells the stored image size: set it")

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """Reconstruct the batch's valid images; a batch whose images are all written already (``skip_ids``) is
        skipped, a partly written one is recomputed whole (the same batch composition gives bit-identical
        images) and only its missing images are returned."""
        subject = batch["subject"]
        done = self.skip_ids.get(subject, set())
        valid = batch["valid"].cpu()
        missing = torch.tensor([bool(v) and int(i) not in done for v, i in zip(valid, batch["nsd_id"])],
                               dtype=torch.bool)
        record: dict[str, Any] = {"subject": subject, "nsd_id": batch["nsd_id"][missing].cpu()}
        if not missing.any():
            return record
        sub = {k: (v[valid.to(v.device)] if isinstance(v, torch.Tensor) and len(v) == len(valid) else v)
               for k, v in batch.items()}
        experts = self.expert_embeddings(sub, subject)
        images, routing = self.reconstruct(experts, subject, sub["nsd_id"].cpu())
        keep = missing[valid]
        record["images"] = (images[keep] * 255).round().to(torch.uint8).cpu()
        record["routing"] = {k: (v if k == "timesteps" else v[:, keep]).cpu() for k, v in routing.items()}
        return record

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        h = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=h.lr, weight_decay=h.weight_decay)
        if self.lr_scheduler_factory is not None:
            scheduler = self.lr_scheduler_factory(optimizer)
        else:
            warmup = max(1, h.warmup_steps)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ adapter-only checkpoints
    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """The stored parts: LoRA, routers, projections (and IP key/value weights when trained), including any
        that a transfer keeps frozen (loaded from ``init_from``)."""
        names = self.stored_names()
        return {k: v for k, v in self.state_dict().items() if k in names}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = self.trained_state_dict()
        checkpoint["provenance"] = self.provenance()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        expected = set(self.trained_state_dict())
        found = set(checkpoint["state_dict"])
        if expected != found:
            missing, extra = sorted(expected - found), sorted(found - expected)
            raise ValueError(f"stage-2 checkpoint does not match this configuration: missing {missing[:3]}, "
                             f"unexpected {extra[:3]} (different branches, LoRA targets or IP-Adapter training?)")

    def export_lora(self, directory: str | Path) -> Path:
        """Write the UNet LoRA in diffusers' format (``pytorch_lora_weights.safetensors``), loadable with
        ``StableDiffusionXLPipeline.load_lora_weights``."""
        from diffusers import StableDiffusionXLPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet))
        StableDiffusionXLPipeline.save_lora_weights(str(directory), unet_lora_layers=layers)
        return Path(directory)

    def provenance(self) -> dict[str, Any]:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        sources = {"sdxl_dir": self.hparams.sdxl_dir, "image_encoder": self.hparams.image_encoder,
                   "text_encoder": self.hparams.text_encoder, "ip_adapter_weights": self.hparams.ip_adapter_weights,
                   "init_from": self.hparams.get("init_from")}
        data: dict[str, Any] = {"data_format_version": FORMAT_VERSION, "sources": sources}
        if dm is not None and getattr(dm, "metas", None):
            data.update(data_dir=str(dm.data_dir), subjects=list(dm.subjects),
                        sessions={s: dm.sessions(s) for s in dm.subjects})
        return provenance(resolved_config=self.run_config, **data)
