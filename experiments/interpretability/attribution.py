"""Integrated gradients of every expert's head output with respect to the voxels, batched.

Objective of expert e of level l for one row (one repeat of one test image):
- ``target`` (default): its clip-head output projected on the unit-norm target embedding of the image,
  ``clip_l[e] . t / |t|`` (the expert's additive share of the model's level-averaged prediction along the truth);
- ``backbone_sum``: the sum of its backbone-head output (the reference's neuron selector).
Column J - 1 is the whole model: ``clip_mean . t / |t|`` (or the sum of ``backbone_mean``).

Integrated gradients with a zero voxel baseline and ``steps`` midpoint-rule points: all steps of all rows of a chunk,
in J copies (one per objective), go through the MoE in one forward and one backward (see ``integrated_gradients``):
no Python loop over experts, samples or steps. Rows are independent in eval mode, so the gradient of a sum over
rows gives every row's gradient. (``autograd.grad(is_grads_batched=True)`` was 10x slower: LayerNorm and GELU
backward have no vmap batching rule and fall back to a loop.) Attributions are
averaged over an image's repeats (``repeat_mask``), then summarised over images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from experiments.interpretability.loading import TestSet
from experiments.interpretability.outputs import write_npz

Objective = Literal["target", "backbone_sum"]


@dataclass
class Attributions:
    """Attribution summaries over a subject's test images. J = sum_l E_l experts + 1 (the whole model).

    levels / experts: (J,) level and expert index of each column (-1 for the whole model);
    mean, mean_abs: (J, V) mean over images of the repeat-averaged attribution and of its absolute value;
    image_sum, image_abs: (N, J) per image, the sum over voxels of the attribution and of its absolute value;
    image_delta: (N, J) objective(x) - objective(0) per image (integrated gradients' completeness: ~ image_sum);
    overall: (N, V) per-image attribution of the whole model; nsd_id: (N,).
    """

    levels: np.ndarray
    experts: np.ndarray
    mean: np.ndarray
    mean_abs: np.ndarray
    image_sum: np.ndarray
    image_abs: np.ndarray
    image_delta: np.ndarray
    overall: np.ndarray
    nsd_id: np.ndarray
    steps: int
    objective: str

    @property
    def num_levels(self) -> int:
        return int(self.levels.max()) + 1

    def columns(self, level: int) -> np.ndarray:
        """Column indices of ``level``'s experts, in expert order."""
        return np.flatnonzero(self.levels == level)

    def completeness_error(self) -> float:
        """Median over images and columns of |sum of attributions - objective difference| / mean |difference|."""
        scale = np.abs(self.image_delta).mean() + 1e-12
        return float(np.median(np.abs(self.image_sum - self.image_delta)) / scale)

    def save(self, path: Path) -> Path:
        return write_npz(path, levels=self.levels, experts=self.experts, mean=self.mean, mean_abs=self.mean_abs,
                         image_sum=self.image_sum, image_abs=self.image_abs, image_delta=self.image_delta,
                         overall=self.overall, nsd_id=self.nsd_id, steps=np.int64(self.steps),
                         objective=np.str_(self.objective))

    @classmethod
    def load(cls, path: Path) -> Attributions:
        with np.load(path) as z:
            data = {k: z[k] for k in z.files}
        return cls(**{k: v for k, v in data.items() if k not in ("steps", "objective")},
                   steps=int(data["steps"]), objective=str(data["objective"]))


def expert_objectives(out, target: torch.Tensor | None, objective: Objective) -> torch.Tensor:
    """MoEOutput over B rows (+ (B, D) targets) -> (B, J) objectives: every expert of every level, then the model."""
    if objective == "target":
        if target is None:
            raise ValueError("objective 'target' needs the test targets (data.targets must include the model's "
                             "target); use objective 'backbone_sum' otherwise")
        unit = target / target.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        parts = [torch.einsum("bed,bd->be", c, unit) for c in out.clip]
        parts.append((out.clip_mean * unit).sum(-1, keepdim=True))
    elif objective == "backbone_sum":
        parts = [b.sum(-1) for b in out.backbone] + [out.backbone_mean.sum(-1, keepdim=True)]
    else:
        raise ValueError(f"unknown objective {objective!r} (target, backbone_sum)")
    return torch.cat(parts, 1)


def affine_adapter(adapters: nn.Module, subject: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A subject's adapter as one affine map h = W x + b: ``W`` (H, V) and ``b`` (H,); with a bottleneck
    (V -> b -> H, two Linears, no activation) the effective product W2 W1 and bias W2 b1 + b2."""
    adapter = adapters.adapters[subject]
    layers = list(adapter) if isinstance(adapter, nn.Sequential) else [adapter]
    if not all(isinstance(layer, nn.Linear) for layer in layers):
        raise TypeError(f"{subject}: the adapter is not a stack of Linear layers; integrated gradients through "
                        "the adapter's affine map need one")
    weight, bias = layers[0].weight.detach(), layers[0].bias.detach()
    for layer in layers[1:]:
        weight, bias = layer.weight.detach() @ weight, layer.weight.detach() @ bias + layer.bias.detach()
    return weight, bias


def integrated_gradients(moe: nn.Module, weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor,
                         target: torch.Tensor | None, steps: int, objective: Objective = "target",
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, V) voxels (+ (n, D) targets) -> attributions (J, n, V) with a zero baseline and ``steps`` midpoint
    points, and objective(x) - objective(0) (n, J).

    The adapter is affine (h = W x + b), so the path alpha * x maps to h = b + alpha * W x and the voxel gradient
    is W^T times the gradient at h: the J objectives are differentiated on J copies of the steps x n hidden rows
    in one forward and one backward (copy j's loss is objective j), then mapped to voxels with one matmul."""
    n, v = x.shape
    alphas = (torch.arange(steps, dtype=x.dtype, device=x.device) + 0.5) / steps
    drive = x @ weight.T  # (n, H)
    path = bias + alphas[:, None, None] * drive[None]  # (steps, n, H)
    with torch.no_grad():
        ends = expert_objectives(moe(torch.cat([drive + bias, bias.expand(n, -1)])),
                                 None if target is None else torch.cat([target, target]), objective)
    j = ends.shape[1]
    rows = path.expand(j, steps, n, -1).reshape(j * steps * n, -1).detach().requires_grad_(True)
    rows_target = None if target is None else target.repeat(j * steps, 1)
    with torch.enable_grad():
        y = expert_objectives(moe(rows), rows_target, objective).reshape(j, steps * n, j)
        own = y.diagonal(dim1=0, dim2=2).sum()  # copy j keeps only objective j
        (grad_h,) = torch.autograd.grad(own, rows)
    grad_h = grad_h.reshape(j, steps, n, -1).mean(1)  # (J, n, H)
    return (grad_h @ weight) * x[None], ends[:n] - ends[n:]


def attribute_test_set(moe: nn.Module, adapters: nn.Module, subject: str, test: TestSet, steps: int = 32,
                       objective: Objective = "target", max_rows: int = 4096, device: str | torch.device = "cpu",
                       log: Callable[[str], None] | None = None) -> Attributions:
    """Integrated gradients over every valid repeat of every test image, averaged per image over its repeats;
    As many whole images per forward and backward as fit in ``max_rows`` rows (J copies x ``steps`` x repeats
    per image; at least one image): at paper scale (J = 31, 32 steps, 3 repeats) that is one image, 2976 rows
    (several GB of activations on the accelerator)."""
    n_images = len(test)
    if n_images == 0:
        raise ValueError(f"{test.subject}: no test images to attribute")
    weight, bias = (t.to(device) for t in affine_adapter(adapters, subject))
    mask = test.repeat_mask
    counts = mask.sum(1).clamp_min(1).float()
    target = test.target if objective == "target" else None
    batch_images = max(1, max_rows // ((sum(moe.num_experts) + 1) * steps * mask.shape[1]))
    mean = mean_abs = overall = image_sum = image_abs = image_delta = None
    for start in range(0, n_images, batch_images):
        stop = min(start + batch_images, n_images)
        rows = mask[start:stop].nonzero()  # (n_rows, 2): image (within chunk), repeat
        x = test.voxels[start:stop][rows[:, 0], rows[:, 1]].to(device)
        t = None if target is None else target[start:stop][rows[:, 0]].to(device)
        attr, delta = integrated_gradients(moe, weight, bias, x, t, steps, objective)
        weights = (1.0 / counts[start:stop][rows[:, 0]]).to(device)
        index = rows[:, 0].to(device)
        j, v = attr.shape[0], attr.shape[2]
        per_image = torch.zeros(j, stop - start, v, device=device).index_add_(1, index,
                                                                              attr * weights[None, :, None])
        per_delta = torch.zeros(stop - start, j, device=device).index_add_(0, index, delta * weights[:, None])
        if mean is None:
            mean, mean_abs = torch.zeros(j, v), torch.zeros(j, v)
            overall = torch.zeros(n_images, v)
            image_sum, image_abs, image_delta = (torch.zeros(n_images, j) for _ in range(3))
        mean += per_image.sum(1).cpu() / n_images
        mean_abs += per_image.abs().sum(1).cpu() / n_images
        overall[start:stop] = per_image[-1].cpu()
        image_sum[start:stop] = per_image.sum(-1).T.cpu()
        image_abs[start:stop] = per_image.abs().sum(-1).T.cpu()
        image_delta[start:stop] = per_delta.cpu()
        if log is not None:
            log(f"integrated gradients: {stop}/{n_images} images")
    levels = [lvl for lvl, e in enumerate(moe.num_experts) for _ in range(e)] + [-1]
    experts = [i for e in moe.num_experts for i in range(e)] + [-1]
    return Attributions(levels=np.array(levels), experts=np.array(experts), mean=mean.numpy(),
                        mean_abs=mean_abs.numpy(), image_sum=image_sum.numpy(), image_abs=image_abs.numpy(),
                        image_delta=image_delta.numpy(), overall=overall.numpy(), nsd_id=np.asarray(test.nsd_id),
                        steps=steps, objective=objective)


@torch.no_grad()
def contributions(moe: nn.Module, adapters: nn.Module, subject: str, test: TestSet, objective: Objective = "target",
                  device: str | torch.device = "cpu", batch_rows: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Every column's objective at the test images (no gradients), averaged over repeats: (N, J) scores and the
    (J,) level of each column (-1: the whole model)."""
    weight, bias = (t.to(device) for t in affine_adapter(adapters, subject))
    mask = test.repeat_mask
    rows = test.voxels[mask]
    image = mask.nonzero()[:, 0]
    target = None if objective != "target" or test.target is None else test.target[image]
    parts = []
    for start in range(0, len(rows), batch_rows):
        t = None if target is None else target[start:start + batch_rows].to(device)
        out = moe(rows[start:start + batch_rows].to(device) @ weight.T + bias)
        parts.append(expert_objectives(out, t, objective).cpu())
    values = torch.cat(parts)
    weights = 1.0 / mask.sum(1).float()[image]
    scores = torch.zeros(len(test), values.shape[1]).index_add_(0, image, values * weights[:, None])
    levels = [lvl for lvl, e in enumerate(moe.num_experts) for _ in range(e)] + [-1]
    return scores.numpy(), np.array(levels)
