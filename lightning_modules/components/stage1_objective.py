"""Stage 1's objective: the loss recipe and its schedule, one definition (``BrainEncoderModule`` composes it).

loss = clip_scale * contrastive(clip heads) [+ mse_scale * MSE(clip heads)]
       [+ prior_scale * prior MSE + cos_scale * (1 - cos(prior output)) + prior_clip_scale * contrastive(prior)]
       [+ balance_scale * balance] [+ token_scale * contrastive(token head)]

The contrastive term is BiMixCo (``mixco_nce``, on mixed voxels) during the first ``mixup_pct`` of training, then
SoftCLIP (``soft_clip_loss``) with its temperature cosine-annealed from ``softclip_temperature[0]`` to ``[1]`` over
the rest. Built from the module's hyperparameters at every call (``from_hparams``), so it always reads them as set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.components.losses import cosine_anneal, cosine_loss, mixco_nce, soft_clip_loss
from lightning_modules.components.moe_encoder import MoEOutput


@dataclass(frozen=True)
class Stage1Objective:
    """The weights and schedule of stage 1's loss (the ``BrainEncoderModule`` arguments of the same names)."""

    clip_scale: float = 1.0
    prior_scale: float = 30.0
    cos_scale: float = 0.5
    mse_scale: float = 0.0
    prior_clip_scale: float = 1.0
    balance_scale: float = 0.0
    mixup_pct: float = 0.33
    mixco_temperature: float = 0.03
    softclip_temperature: tuple[float, float] = (0.02, 0.0375)
    supervise_levels: bool = False
    prior_inputs: Sequence[str] = ("mean",)
    prior_expert_weight: float = 1.0
    token_scale: float = 1.0

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any], prior_inputs: Sequence[str]) -> Stage1Objective:
        names = [f for f in cls.__dataclass_fields__ if f != "prior_inputs"]
        return cls(prior_inputs=tuple(prior_inputs), **{k: hparams[k] for k in names})

    def mixing(self, progress: float) -> bool:
        """BiMixCo (True) or SoftCLIP at ``progress`` (global step / total steps) in [0, 1]."""
        return progress < self.mixup_pct

    def contrastive(self, preds: torch.Tensor, target: torch.Tensor, mix: tuple | None, progress: float
                    ) -> torch.Tensor:
        """(N, D) preds and targets -> scalar BiMixCo (``mix``: (betas, perms) while mixing) or SoftCLIP loss at the
        annealed temperature, in float32 (autocast off)."""
        with torch.autocast(device_type=preds.device.type, enabled=False):
            p, t = F.normalize(preds.float(), dim=-1), F.normalize(target.float(), dim=-1)
        if mix is not None:
            return mixco_nce(p, t, self.mixco_temperature, *mix)
        start = self.mixup_pct
        after = (progress - start) / max(1e-8, 1 - start)
        return soft_clip_loss(p, t, cosine_anneal(*self.softclip_temperature, after))

    def prior_conditions(self, out: MoEOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """-> conditions (B, n_inputs, D) in ``prior_inputs`` order (expert rows detached) and the weight of each
        input row (n_inputs,) in the prior loss: every kind's rows share its weight (1, or ``prior_expert_weight``
        for the experts), so each kind is one mean-MSE term."""
        parts, weights = [], []
        for kind in self.prior_inputs:
            if kind == "mean":
                rows = out.backbone_mean[:, None]
            elif kind == "level_sums":
                rows = out.backbone_level_sums
            else:
                rows = torch.cat(out.backbone, 1).detach()
            parts.append(rows)
            weight = self.prior_expert_weight if kind == "experts" else 1.0
            weights.append(torch.full((rows.shape[1],), weight / rows.shape[1], device=rows.device))
        return torch.cat(parts, 1), torch.cat(weights)

    def losses(self, out: MoEOutput, target: torch.Tensor, mix: tuple | None, progress: float,
               prior: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """Every term (``clip``, ``mse``, ``prior``, ``prior_cos``, ``prior_clip``, ``balance``) and their weighted
        sum ``loss``; ``prior``: the jointly trained ``DiffusionPrior`` (None: no prior terms)."""
        losses: dict[str, torch.Tensor] = {}
        preds = [out.clip_mean] + ([out.clip_level_sums[:, lvl] for lvl in range(len(out.clip))]
                                   if self.supervise_levels else [])
        losses["clip"] = torch.stack([self.contrastive(p, target, mix, progress) for p in preds]).mean()
        total = self.clip_scale * losses["clip"]
        if self.mse_scale:
            losses["mse"] = F.mse_loss(out.clip_mean, target)
            total = total + self.mse_scale * losses["mse"]
        if prior is not None:
            cond, row_weights = self.prior_conditions(out)
            n_inputs = cond.shape[1]
            _, pred = prior.loss(cond.reshape(-1, cond.shape[-1]), target.repeat_interleave(n_inputs, 0))
            pred = pred.reshape(len(target), n_inputs, -1)
            with torch.autocast(device_type=pred.device.type, enabled=False):
                per_row = (pred.float() - target[:, None].float()).pow(2).mean((0, 2))  # (n_inputs,)
                losses["prior"] = (per_row * row_weights).sum()
            prior_out = pred[:, 0]
            losses["prior_cos"] = cosine_loss(prior_out, target)
            total = total + self.prior_scale * losses["prior"] + self.cos_scale * losses["prior_cos"]
            if self.prior_clip_scale:
                losses["prior_clip"] = self.contrastive(prior_out, target, mix, progress)
                total = total + self.prior_clip_scale * losses["prior_clip"]
        losses["balance"] = out.balance
        if self.balance_scale:
            total = total + self.balance_scale * out.balance
        losses["loss"] = total
        return losses

    def add_token_term(self, losses: dict[str, torch.Tensor], tokens: torch.Tensor, target: torch.Tensor,
                       mix: tuple | None, progress: float) -> None:
        """The MindEye2 token target: ``losses["token"]`` (contrastive on the flattened (N, T * C) tokens) added to
        ``losses["loss"]`` with ``token_scale``."""
        losses["token"] = self.contrastive(tokens, target, mix, progress)
        losses["loss"] = losses["loss"] + self.token_scale * losses["token"]
