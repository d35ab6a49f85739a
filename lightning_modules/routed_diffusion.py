"""Stage 2 LightningModule: SDXL conditioned on frozen stage-1 experts through temporal and spatial routers.

Per sample, once: voxels -> frozen stage-1 encoder (or its conditioning cache) -> per-level expert embeddings
[(B, E_l, D)], optionally each through the frozen stage-1 prior. Per denoising step: spatial router (noisy latent
pooled to a g x g grid -> (B, G, E_l) weights), temporal router (timestep sinusoid -> (B, L) level weights) ->
tokens (B, G or 1, D) per branch; image tokens go through decoupled (IP-Adapter style, optionally regional)
attention in every cross-attention layer, text tokens become the prompt. Trained parts: ``stage2_parts`` (the one
definition); the rest is frozen by ``requires_grad_(False)``, never by ``torch.no_grad`` around a trained path, and
checkpoints hold only the trained parts. Per-step conditioning, UNet call and losses: ``routed_conditioning``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable
from torchmetrics import MeanMetric

from datamodules.common import provenance
from datamodules.shard_format import FORMAT_VERSION
from lightning_modules import frozen_sdxl, routed_sampling, sdxl_loading, stage1_conditions, stage2_parts
from lightning_modules.adamw import AdamWImpl, adamw
from lightning_modules.components.brain_prompt import PooledMode, PromptMode
from lightning_modules.components.diffusion_loss import training_noise
from lightning_modules.components.injection import ImageTokenProjection, install_processors
from lightning_modules.components.level_prior import KLDirection
from lightning_modules.components.routed_branch import BranchSpec
from lightning_modules.condition_tables import ConditionTable, build_condition_tables
from lightning_modules.routed_conditioning import RoutedConditioning
from lightning_modules.routed_sampling import SamplerName
from lightning_modules.run_records import attached_datamodule, datamodule_record, write_run_record
from lightning_modules.sdxl_loading import DTYPES, LORA_TARGETS  # noqa: F401 - LORA_TARGETS: importable here
from lightning_modules.stage2_parts import PARTS, Stage2Part  # noqa: F401 - PARTS: importable from here as before

REFERENCE_NEGATIVE = ("low quality, blurry, deformed, bad anatomy, disfigured, poorly drawn, mutated, extra limbs")


class RoutedDiffusionModule(RoutedConditioning, L.LightningModule):
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
        lr / weight_decay / adamw_impl / warmup_steps / lr_scheduler: AdamW (``adamw``), warmup then constant if not given.
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
        condition_cache: per branch, a conditioning cache (``experiments.cache_conditions``) read instead of running
            the branch's frozen stage-1 encoder and prior, which are then never built (``condition_cache``).
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
                 weight_decay: float = 1e-2, adamw_impl: AdamWImpl = "fused", warmup_steps: int = 500,
                 lr_scheduler: LRSchedulerCallable | None = None,
                 frozen_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
                 gradient_checkpointing: bool = False, val_timesteps: list[int] | None = None, val_seed: int = 0,
                 sampler: SamplerName = "euler", inference_steps: int = 50, guidance_scale: float = 5.0,
                 negative_prompt: str = REFERENCE_NEGATIVE, seed: int = 0, init_from: str | None = None,
                 trainable: list[Stage2Part] | None = None, condition_dropout: float = 0.0,
                 condition_tables: dict[str, str] | None = None, shuffle_conditions: bool = False,
                 condition_cache: dict[str, str] | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["lr_scheduler"])
        if image_branch is None and text_branch is None:
            raise ValueError("model.image_branch and model.text_branch are both null: enable at least one")
        self.lr_scheduler_factory = lr_scheduler
        self.run_config: str | None = None
        # checkpoints hold only the trained parameters; on_load_checkpoint checks that exactly those are present
        self.strict_loading = False
        # the frozen SDXL parts' architecture only (on meta); configure_model loads their weights (frozen_sdxl)
        parts = sdxl_loading.sdxl_skeleton(sdxl_dir, "model.sdxl_dir", frozen_dtype)
        self.unet, self.vae = parts.unet, parts.vae
        self.scheduler_config = dict(parts.scheduler_config)
        self.noise_scheduler = sdxl_loading.training_scheduler(self.scheduler_config)
        self.num_train_timesteps = self.noise_scheduler.config.num_train_timesteps
        self.register_buffer("alphas_cumprod", self.noise_scheduler.alphas_cumprod.clone(), persistent=False)
        self.vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        cross_dim = self.unet.config.cross_attention_dim
        caches = stage2_parts.branch_caches(condition_cache, condition_tables, image=image_branch, text=text_branch)
        branch_kw = dict(frozen_dtype=frozen_dtype, unet=self.unet, num_train_timesteps=self.num_train_timesteps,
                         prior_steps=prior_steps, prior_guidance=prior_guidance, prior_seed=prior_seed,
                         repeat_average=repeat_average)
        self.grid = stage2_parts.regional_grid(image_branch, text_branch)
        # registered inside the UNet, not here; without an image branch they hold no IP weights
        self.ip_processors = tuple(install_processors(self.unet, with_ip=image_branch is not None))
        self.image_encoder, self.image_router = stage2_parts.build_branch(
            image_branch, image_encoder, "model.image_encoder", **caches["image"], **branch_kw)
        self.image_projection = None
        if image_branch is not None:
            self.image_projection = ImageTokenProjection(self.image_encoder.embed_dim, cross_dim, ip_tokens)
        frozen_sdxl.check_frozen_files(ip_adapter_weights)
        for name, value in sdxl_loading.fixed_prompts(parts, negative_prompt).items():
            self.register_buffer(name, value, persistent=False)
        self.text_encoder, self.text_router = stage2_parts.build_branch(
            text_branch, text_encoder, "model.text_encoder", **caches["text"], **branch_kw)
        self.brain_prompt = None if text_branch is None else sdxl_loading.brain_prompt(
            parts, self.text_encoder.embed_dim, cross_dim, prompt_mode, pooled_text)
        self._frozen_loaded = False
        sdxl_loading.add_lora(self.unet, lora_rank, lora_alpha, lora_targets, lora_init)
        # after add_adapter (peft leaves only the UNet's LoRA trainable) the parts (stage2_parts) decide the rest
        self.trainable, self.stored_parts = stage2_parts.trained_and_stored(
            image_branch is not None, bool(ip_adapter_weights), ip_adapter_trainable, trainable)
        stage2_parts.apply_trainable(self.parts(), self.trainable, self.stored_parts, DTYPES[frozen_dtype])
        if not any(p.requires_grad for p in self.parameters()):
            raise ValueError(f"model.trainable {self.trainable} selects no parameters for these branches")
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        stage1_conditions.check_encoders(num_voxels, image_encoder=self.image_encoder, text_encoder=self.text_encoder)
        if not 0.0 <= condition_dropout < 1.0:
            raise ValueError(f"model.condition_dropout must be in [0, 1), got {condition_dropout}")
        self.condition_tables: dict[str, ConditionTable] = build_condition_tables(condition_tables, {
            b: (getattr(self, f"{b}_encoder"), spec) for b, spec in (("image", image_branch), ("text", text_branch))
            if spec is not None})
        self.val_timesteps = list(val_timesteps or [100, 300, 500, 700, 900])
        self.val_loss = MeanMetric()
        self.val_loss_at = torch.nn.ModuleList(MeanMetric() for _ in self.val_timesteps)
        self.skip_ids: dict[str, set[int]] = {}  # predict: images already written (set by the writer callback)

    # ------------------------------------------------------------------ parts and transfer (stage2_parts)
    def parts(self) -> dict[str, list[torch.nn.Module]]:
        """The module groups ``trainable`` names (lora, routers, projections, ip_attention), by reference
        (``stage2_parts``)."""
        return stage2_parts.stage2_parts(self.unet, (self.image_router, self.text_router), self.image_projection,
                                         self.brain_prompt, self.ip_processors,
                                         bool(self.hparams.ip_adapter_weights))

    def stored_names(self) -> set[str]:
        """Parameter names of the parts a checkpoint holds."""
        return stage2_parts.stored_names(self, self.parts(), self.stored_parts)

    def parameter_counts(self) -> dict[str, Any]:
        """Parameters per part (params, share of the module's total, trainable) and the trained total."""
        return stage2_parts.parameter_counts(self, self.parts(), self.trainable)

    def configure_model(self) -> None:
        """Load the frozen weights into the architecture ``__init__`` built, once (``frozen_sdxl``), and for a fit
        the ``init_from`` transfer; Lightning calls it before restoring a checkpoint, a script without a Trainer."""
        if not self._frozen_loaded:
            trainer = self._trainer
            frozen_sdxl.load_frozen_parts(self, fitting=trainer is None or trainer.state.fn == "fit")
            self._frozen_loaded = True

    def load_from_stage2(self, path: str) -> None:
        """Load the stored parts (LoRA, routers, projections, ...) of another stage-2 checkpoint."""
        stage2_parts.load_stage2_transfer(self, path, self.stored_names())

    def on_fit_start(self) -> None:
        write_run_record(self.trainer, "parameters.json", {**self.parameter_counts(), "provenance": self.provenance()})

    # ------------------------------------------------------------------ conditioning (RoutedConditioning)
    def train(self, mode: bool = True):
        """The frozen parts stay in eval mode: the VAE here, the stage-1 encoders in ``FrozenStage1.train``."""
        super().train(mode)
        self.vae.eval()
        return self

    def training_step(self, batch: dict[str, dict[str, Any]], batch_idx: int) -> torch.Tensor:
        latents, experts = self.encode_batch(batch)
        noise = training_noise(latents, self.hparams.noise_offset)
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
    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Diffusion loss at fixed timesteps and fixed noise per image; padding rows get weight 0 (every rank
        updates every metric)."""
        subject, valid = batch["subject"], batch["valid"]
        latents = self.encode_latents(batch, sample=False)
        experts = self.expert_embeddings(batch, subject)
        weight = valid.float()
        for k, t_value in enumerate(self.val_timesteps):
            noise = routed_sampling.image_noise(subject, batch["nsd_id"], tuple(latents.shape[1:]),
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
        return routed_sampling.reconstruct(self, experts, subject, nsd_ids, steps, guidance_scale, record_routing)

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """Reconstruct the batch's valid images; a batch whose images are all written already (``skip_ids``) is
        skipped, a partly written one is recomputed whole (the same batch composition gives bit-identical
        images) and only its missing images are returned (``routed_sampling.predict_record``)."""
        return routed_sampling.predict_record(self, batch, self.skip_ids.get(batch["subject"], set()))

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        h = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = adamw(params, h.lr, h.weight_decay, h.adamw_impl)
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
        stage2_parts.check_stored(set(self.trained_state_dict()), set(checkpoint["state_dict"]))

    def export_lora(self, directory: str | Path) -> Path:
        """Write the UNet LoRA in diffusers' format (``pytorch_lora_weights.safetensors``), loadable with
        ``StableDiffusionXLPipeline.load_lora_weights`` (``sdxl_loading.export_lora``)."""
        return sdxl_loading.export_lora(self.unet, directory)

    def provenance(self) -> dict[str, Any]:
        sources = {"sdxl_dir": self.hparams.sdxl_dir, "image_encoder": self.hparams.image_encoder,
                   "text_encoder": self.hparams.text_encoder, "ip_adapter_weights": self.hparams.ip_adapter_weights,
                   "init_from": self.hparams.get("init_from"), "condition_cache": self.hparams.get("condition_cache")}
        data = datamodule_record(attached_datamodule(self), "data_dir", "subjects", "sessions")
        return provenance(resolved_config=self.run_config, data_format_version=FORMAT_VERSION, sources=sources,
                          **data)
