"""Frozen stage-1 encoders as the source of stage 2's expert embeddings.

Voxels -> per-level expert embeddings [(b, E_l, D)]: the experts' ``clip`` head outputs, or each expert's
``backbone`` embedding through the stage-1 diffusion prior (``source: prior``). The prior runs once per expert
embedding and sample, with a fixed noise vector per expert and a fixed number of DDIM steps, identically in
training and inference; it is frozen and outside autograd (everything after it, the routers included, is not).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import nn

from datamodules.shard_format import subject_name
from lightning_modules.stage1_evaluation import repeat_weights
from lightning_modules.stage1_files import build_stage1, read_stage1


def _load_stage1(cls, checkpoint: str, option: str = "checkpoint"):
    """``cls`` (``BrainEncoderModule``) rebuilt from a stage-1 checkpoint or export (``stage1_files``): only the
    state dict and hyperparameters are read (``weights_only=True``, memory-mapped: a checkpoint's optimizer state is
    never loaded; a file needing more than tensors and plain data is refused naming ``option``), with Lightning's
    CLI hyperparameter context cleared while the module is built (``build_stage1``)."""
    return build_stage1(cls, read_stage1(checkpoint, option), option)


class FrozenStage1(nn.Module):
    """A stage-1 checkpoint's adapters, MoE and prior, frozen (``requires_grad_(False)``, always in eval mode).

    Args:
        checkpoint: a stage-1 Lightning checkpoint (``.ckpt``) or export directory (or its ``model.safetensors``,
            ``python -m experiments.export_stage1``); ``option`` names the config key it came from (for errors).
        source: ``prior`` or ``clip`` (see module docstring).
        prior_steps / prior_guidance / prior_seed: the deterministic prior sampler.
        repeat_average: evaluation batches (b, R, V) average the R repeats at the expert ``embeddings`` (before
            the prior and the routers) or at the ``input`` voxels.
    """

    def __init__(self, checkpoint: str, option: str, source: Literal["prior", "clip"] = "prior",
                 prior_steps: int = 10, prior_guidance: float | None = None, prior_seed: int = 0,
                 repeat_average: Literal["embeddings", "input"] = "embeddings"):
        super().__init__()
        from lightning_modules.brain_encoder import BrainEncoderModule
        from lightning_modules.components.target_embedders import MissingWeightsError

        if not checkpoint or not Path(checkpoint).exists():
            raise MissingWeightsError(f"{option}: no stage-1 checkpoint at {checkpoint!r} (train stage 1 first, or "
                                    "drop this branch)")
        stage1 = _load_stage1(BrainEncoderModule, checkpoint, option)
        self.checkpoint, self.target = str(checkpoint), stage1.hparams.target
        self.adapters, self.moe = stage1.adapters, stage1.moe
        self.num_voxels = dict(stage1.num_voxels)
        self.source, self.prior_steps, self.prior_guidance = source, prior_steps, prior_guidance
        self.repeat_average = repeat_average
        self.prior = stage1.prior if source == "prior" else None
        if source == "prior":
            if stage1.prior is None:
                raise ValueError(f"{option}: {checkpoint} has no prior; set the branch's source: clip")
            if "experts" not in stage1.prior_inputs:
                raise ValueError(f"{option}: the prior of {checkpoint} was trained on {stage1.prior_inputs}, not "
                                 "on expert embeddings; retrain stage 1 with model.prior_inputs including "
                                 "'experts', or set the branch's source: clip")
            generator = torch.Generator().manual_seed(prior_seed)
            noise = torch.randn(sum(self.moe.num_experts), self.moe.out_dim, generator=generator)
            self.register_buffer("prior_noise", noise, persistent=False)
        self.requires_grad_(False)
        self.eval()

    @property
    def num_experts(self) -> list[int]:
        return list(self.moe.num_experts)

    @property
    def embed_dim(self) -> int:
        return self.moe.out_dim

    def train(self, mode: bool = True) -> FrozenStage1:
        return super().train(False)

    def check_subjects(self, subjects: list[str] | dict[str, int], option: str) -> None:
        """Every data subject has an adapter here; given ``{subject: voxel count}``, with that many voxels."""
        unknown = [s for s in subjects if subject_name(s) not in self.num_voxels]
        if unknown:
            raise ValueError(f"{option}: {self.checkpoint} has no adapter for {unknown} (it knows "
                             f"{sorted(self.num_voxels)}); train stage 1 on them or transfer it first")
        if isinstance(subjects, dict):
            for s, count in subjects.items():
                own = self.num_voxels[subject_name(s)]
                if int(count) != own:
                    raise ValueError(f"{option}: {subject_name(s)} has {own} voxels in {self.checkpoint} but "
                                     f"{int(count)} in the data: use the stage-1 checkpoint trained on this data")

    def _experts(self, voxels: torch.Tensor, subject: str) -> torch.Tensor:
        """(n, V) -> (n, sum E, D) expert embeddings before the prior."""
        out = self.moe(self.adapters(voxels.to(next(self.moe.parameters()).dtype), subject))
        return torch.cat(out.backbone if self.source == "prior" else out.clip, 1)

    def embed(self, sub: dict, subject: str) -> list[torch.Tensor]:
        """A sub-batch (``voxels`` (b, V), or (b, R, V) with ``repeat_mask``) -> [(b, E_l, D)] per level."""
        return self(sub["voxels"], subject, sub.get("repeat_mask"))

    @torch.no_grad()
    def forward(self, voxels: torch.Tensor, subject: str, repeat_mask: torch.Tensor | None = None
                ) -> list[torch.Tensor]:
        """(b, V) or (b, R, V) with (b, R) repeat mask -> [(b, E_l, D)] per level."""
        if voxels.dim() == 3:
            b, r, v = voxels.shape
            mask = repeat_mask if repeat_mask is not None else voxels.new_ones(b, r, dtype=torch.bool)
            weights = repeat_weights(mask)
            if self.repeat_average == "input":
                experts = self._experts((voxels * weights[..., None]).sum(1), subject)
            else:
                experts = self._experts(voxels.reshape(b * r, v), subject)
                experts = (experts.reshape(b, r, *experts.shape[1:]) * weights[..., None, None]).sum(1)
        else:
            experts = self._experts(voxels, subject)
        if self.prior is not None:
            b, e, d = experts.shape
            flat = self.prior.sample(experts.reshape(b * e, d), steps=self.prior_steps,
                                     guidance_scale=self.prior_guidance,
                                     noise=self.prior_noise.repeat(b, 1))
            experts = flat.reshape(b, e, d)
        return list(experts.split(self.num_experts, 1))


def check_encoders(num_voxels: dict[str, int] | None, **encoders: FrozenStage1 | None) -> None:
    """Every data subject (``num_voxels``, linked from the data) is known to every given encoder (keyword: the
    ``model.`` option it came from), with its voxel count."""
    for option, encoder in encoders.items():
        if num_voxels and encoder is not None:
            encoder.check_subjects(dict(num_voxels), f"model.{option}")
