"""Stage-1 losses as pure functions (MindEye2 / MoRE-Brain recipes): SoftCLIP, BiMixCo, cosine, schedules.

The losses run in float32 with autocast off (``fp32``): contrastive logits ``preds @ targets.T / T`` with T of
0.02-0.04 scale bf16's ~3 significant digits by 25-50, which under ``bf16-mixed`` would make the loss (and its
gradient) noise at the level of the differences it has to resolve.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F


def fp32(loss):
    """Run ``loss`` with autocast disabled and every floating tensor argument at least float32."""
    def up(a):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return a.to(torch.promote_types(a.dtype, torch.float32))
        return a

    @functools.wraps(loss)
    def wrapper(*args, **kwargs):
        device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        with torch.autocast(device_type=device, enabled=False):
            return loss(*map(up, args), **{k: up(v) for k, v in kwargs.items()})
    return wrapper


@fp32
def soft_clip_loss(preds: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """SoftCLIP: cross-entropy of brain->target logits against softmax(target-target similarity / T), averaged
    over both directions. (N, D) L2-normalised preds and targets -> scalar."""
    target_logits = targets @ targets.T / temperature
    logits = preds @ targets.T / temperature
    soft = target_logits.softmax(-1)
    forward = -(logits.log_softmax(-1) * soft).sum(-1).mean()
    backward = -(logits.T.log_softmax(-1) * soft).sum(-1).mean()
    return (forward + backward) / 2


def mixco_labels(betas: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Soft labels of BiMixCo: row i puts ``betas[i]`` on i and ``1 - betas[i]`` on ``perm[i]``, (N,) -> (N, N)."""
    labels = torch.diag(betas)
    labels[torch.arange(len(betas), device=betas.device), perm] += 1 - betas
    return labels


@fp32
def mixco_nce(preds: torch.Tensor, targets: torch.Tensor, temperature: float, betas: torch.Tensor,
              perm: torch.Tensor, bidirectional: bool = True) -> torch.Tensor:
    """BiMixCo contrastive loss on mixed inputs, (N, D) normalised preds/targets -> scalar."""
    logits = preds @ targets.T / temperature
    labels = mixco_labels(betas, perm)
    forward = -(logits.log_softmax(-1) * labels).sum(-1).mean()
    if not bidirectional:
        return forward
    backward = -(logits.T.log_softmax(-1) * labels.T).sum(-1).mean()
    return (forward + backward) / 2


def mixco_inputs(voxels: torch.Tensor, generator: torch.Generator | None = None, beta: float = 0.15,
                 mix_fraction: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mix a random half of the samples with a random partner: (N, V) -> mixed (N, V), betas (N,), perm (N,).
    Unmixed samples get beta 1 (their label is themselves). The permutation and the selection are drawn on the
    ``generator``'s device (without one: the voxels' device), the betas on the voxels' device."""
    n = voxels.shape[0]
    device = voxels.device
    draw_on = generator.device if generator is not None else device
    perm = torch.randperm(n, generator=generator, device=draw_on).to(device)
    concentration = torch.full((), beta, device=device)
    betas = torch.distributions.Beta(concentration, concentration, validate_args=False).sample((n,)).to(voxels.dtype)
    select = (torch.rand(n, generator=generator, device=draw_on) <= mix_fraction).to(device)
    betas = torch.where(select, betas, torch.ones_like(betas))
    mixed = voxels * betas[:, None] + voxels[perm] * (1 - betas[:, None])
    return mixed, betas, perm


@fp32
def cosine_loss(preds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1 - mean cosine similarity, (N, D) x (N, D) -> scalar."""
    return 1 - F.cosine_similarity(preds, targets, dim=-1).mean()


def cosine_anneal(start: float, end: float, progress: float) -> float:
    """Cosine interpolation from ``start`` (progress 0) to ``end`` (progress 1)."""
    progress = min(max(progress, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))
