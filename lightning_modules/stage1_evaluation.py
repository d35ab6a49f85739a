"""Stage 1's evaluation outside the hooks: repeat averaging, the metric updates and their collection, and the
prediction record. ``BrainEncoderModule``'s validation / test / predict steps are wiring around these.

MindEye2 retrieval (``RetrievalMetric``: min(300, N) candidates, 30 draws) on the level-averaged clip output and on
the prior's output, plus per-subject means of cosine, MSE and in-batch top-1 (``MEAN_METRICS``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from lightning_modules.components.moe_encoder import MoEOutput
from lightning_modules.metrics import RetrievalMetric, retrieval_top1

MEAN_METRICS = ("cosine", "mse", "in_batch_fwd", "prior_cosine", "prior_mse", "token_in_batch_fwd")


def repeat_weights(mask: torch.Tensor) -> torch.Tensor:
    """(b, R) repeat mask -> (b, R) weights averaging the present repeats (rows with none: all zero)."""
    return mask.float() / mask.float().sum(1, keepdim=True).clamp_min(1)


def encode_repeats(encode: Callable[[torch.Tensor, str], MoEOutput], voxels: torch.Tensor, mask: torch.Tensor,
                   subject: str, repeat_average: str) -> tuple[MoEOutput, Callable[[torch.Tensor], torch.Tensor]]:
    """(b, R, V) voxels and (b, R) repeat mask -> ``encode``'s MoEOutput over b*R (``output`` averaging) or b
    (``input`` averaging) rows, and a function that averages a (rows, ...) tensor to (b, ...)."""
    b, r, v = voxels.shape
    weights = repeat_weights(mask)
    if repeat_average == "input":
        out = encode((voxels * weights[..., None]).sum(1), subject)
        return out, lambda x: x
    out = encode(voxels.reshape(b * r, v), subject)

    def average(x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(b, r, *x.shape[1:])
        return (x * weights.reshape(b, r, *([1] * (x.dim() - 2)))).sum(1)
    return out, average


def update_mean(metric, value: Callable[[], torch.Tensor], weight: int) -> None:
    """``metric.update(value(), weight)``; with weight 0 (a rank holding only padding) a zero, so that every rank
    takes part in the same reductions."""
    metric.update(value().to(metric.device) if weight else torch.zeros((), device=metric.device), weight)


def update_metrics(subject: str, r: dict[str, Any], retrieval, prior_retrieval, means: Mapping[str, Any],
                   tokens: torch.Tensor | None = None, token_target: torch.Tensor | None = None) -> None:
    """One evaluated batch ``r`` (``clip``, ``target``, ``nsd_id`` and optionally ``prior``, (n_valid, D)) into the
    subject's retrieval metrics and means ``means[f"{subject}__{name}"]``; ``tokens``: the token head's output."""
    n, s = len(r["target"]), subject
    retrieval.update(r["clip"], r["target"], r["nsd_id"])
    update_mean(means[f"{s}__cosine"], lambda: F.cosine_similarity(r["clip"], r["target"]).mean(), n)
    update_mean(means[f"{s}__mse"], lambda: F.mse_loss(r["clip"], r["target"]), n)
    update_mean(means[f"{s}__in_batch_fwd"],
                lambda: torch.tensor(retrieval_top1(r["clip"], r["target"], candidates=n, draws=1)[0]), n)
    if tokens is not None:
        update_mean(means[f"{s}__token_in_batch_fwd"], lambda: torch.tensor(
            retrieval_top1(tokens, token_target, candidates=n, draws=1)[0]), n)
    if "prior" in r:
        prior_retrieval.update(r["prior"], r["target"], r["nsd_id"])
        update_mean(means[f"{s}__prior_cosine"], lambda: F.cosine_similarity(r["prior"], r["target"]).mean(), n)
        update_mean(means[f"{s}__prior_mse"], lambda: F.mse_loss(r["prior"], r["target"]), n)


def collect_metrics(stage: str, subjects, retrieval: Mapping[str, Any], prior_retrieval: Mapping[str, Any],
                    means: Mapping[str, Any], candidates: int) -> dict[str, float]:
    """Compute and reset every metric -> ``{stage}/{subject}/{name}`` values and the subjects' mean
    ``{stage}/fwd_top1``."""
    metrics: dict[str, float] = {}
    for s in subjects:
        for name, metric in (("", retrieval[s]), ("prior_", prior_retrieval[s])):
            if metric.update_count:
                values = metric.compute()
                metrics[f"{stage}/{s}/{name}fwd_top1"] = float(values["fwd_top1"])
                metrics[f"{stage}/{s}/{name}bwd_top1"] = float(values["bwd_top1"])
                metrics[f"{stage}/{s}/{name}candidates"] = float(min(candidates, int(values["count"])))
            metric.reset()
        for m in MEAN_METRICS:
            metric = means[f"{s}__{m}"]
            if metric.update_count:
                metrics[f"{stage}/{s}/{m}"] = float(metric.compute())
            metric.reset()
    fwd = [v for k, v in metrics.items() if k.endswith("/fwd_top1") and "prior_" not in k]
    if fwd:
        metrics[f"{stage}/fwd_top1"] = sum(fwd) / len(fwd)
    return metrics


def predict_record(subject: str, r: dict[str, Any], num_levels: int) -> dict[str, Any]:
    """One evaluated batch ``r`` -> the embedding writer's record (CPU tensors): the level averages, every level's
    backbone and clip sums and its routing (indices, gates, parent) per valid row."""
    out, average, valid = r["out"], r["average"], r["valid"]
    rows = len(valid)
    record = {"subject": subject, "nsd_id": r["nsd_id"].cpu(), "clip_mean": r["clip"].cpu(),
              "backbone_mean": r["backbone"].cpu(), "target": r["target"].cpu()}
    if "prior" in r:
        record["prior"] = r["prior"].cpu()
    for level in range(num_levels):
        record[f"backbone_level{level}"] = average(out.backbone[level])[valid].cpu()
        record[f"clip_level{level}"] = average(out.clip[level])[valid].cpu()
        routing = out.routing[level]
        for name, value in (("indices", routing.indices), ("gates", routing.gates)):
            record[f"routing_{name}_level{level}"] = value.reshape(rows, -1, *value.shape[1:])[valid].cpu()
        record[f"routing_parent_level{level}"] = routing.parent.cpu()
    return record


def evaluation_metrics(subjects: list[str], candidates: int, draws: int, seed: int
                       ) -> tuple[nn.ModuleDict, nn.ModuleDict, nn.ModuleDict]:
    """Per subject: retrieval of the clip output, retrieval of the prior output, and the ``MEAN_METRICS`` means
    (keys ``{subject}__{name}``)."""
    return (nn.ModuleDict({s: RetrievalMetric(candidates, draws, seed) for s in subjects}),
            nn.ModuleDict({s: RetrievalMetric(candidates, draws, seed) for s in subjects}),
            nn.ModuleDict({f"{s}__{m}": MeanMetric() for s in subjects for m in MEAN_METRICS}))
