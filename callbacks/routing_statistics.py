"""Routing statistics logged to TensorBoard, exact under DDP (torchmetrics sum states).

``RoutingStatistics`` (stage 1): per level and validation, routing entropy, gate-mass share per expert (histogram)
with its balance (coefficient of variation, max / min), unit coverage (none / one / several experts), and routing
stability: the Jaccard overlap of each expert's selected units on a fixed probe batch between consecutive
validations (rank zero, no collectives). Scalars under ``routing/level{l}/...``.

``DiffusionRoutingStatistics`` (stage 2): every ``every_n_epochs`` training epochs, each branch's temporal router
evaluated at every timestep (a curve logged as an image, and its mean per timestep bin as scalars
``routing/{branch}/level{l}/t{lo}-{hi}``), and the mean entropy of the spatial routing maps of the epoch's training
batches per level (``routing/{branch}/spatial_entropy/level{l}``). The KL term is logged by the module every step.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch

from lightning_modules.metrics import (
    LevelRoutingMetric,
    SpatialEntropyMetric,
    jaccard,
    temporal_curve,
)


def _experiment(trainer: L.Trainer):
    logger = trainer.logger
    experiment = getattr(logger, "experiment", None) if logger is not None else None
    return experiment if hasattr(experiment, "add_histogram") else None


class RoutingStatistics(L.Callback):
    """Stage-1 routing statistics over the validation set (see module docstring).

    Args:
        probe_size: rows of the fixed probe batch (first valid rows of the first validation batch; first repeat).
        histograms: also log the per-expert gate-mass shares as TensorBoard histograms.
    """

    def __init__(self, probe_size: int = 16, histograms: bool = True):
        super().__init__()
        self.probe_size, self.histograms = probe_size, histograms
        self.metrics: list[LevelRoutingMetric] | None = None
        self.probe: dict[str, Any] | None = None
        self.previous: list[torch.Tensor] | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.metrics = [LevelRoutingMetric(e).to(pl_module.device) for e in pl_module.moe.num_experts]

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not outputs or "routing" not in outputs:
            return
        for metric, level in zip(self.metrics, outputs["routing"]):
            metric.to(level.probs.device)
            metric.update(level.probs, level.indices, outputs["row_mask"])
        if self.probe is None and trainer.is_global_zero and dataloader_idx == 0:
            keep = batch["valid"].nonzero().flatten()[: self.probe_size]
            self.probe = {"voxels": batch["voxels"][keep, 0].detach().clone(), "subject": batch["subject"]}

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            for metric in self.metrics:
                metric.reset()
            return
        experiment = _experiment(trainer) if trainer.is_global_zero else None
        for level, metric in enumerate(self.metrics):
            if not metric.update_count:
                continue
            values = metric.compute()  # all ranks: the all-reduce of the sums
            metric.reset()
            prefix = f"routing/level{level}"
            for name in ("entropy", "share_cv", "share_max_min"):
                pl_module.log(f"{prefix}/{name}", values[name].float(), sync_dist=False)
            for name, value in zip(("none", "one", "several"), values["coverage"]):
                pl_module.log(f"{prefix}/coverage_{name}", value.float(), sync_dist=False)
            if experiment is not None and self.histograms:
                experiment.add_histogram(f"{prefix}/gate_mass_share", values["share"].float().cpu(),
                                         trainer.global_step)
        if trainer.is_global_zero and self.probe is not None:
            self._stability(pl_module)

    @torch.no_grad()
    def _stability(self, pl_module) -> None:
        was_training = pl_module.training
        pl_module.eval()
        out = pl_module.encode(self.probe["voxels"].to(pl_module.device), self.probe["subject"])
        pl_module.train(was_training)
        current = [r.indices.cpu() for r in out.routing]
        if self.previous is not None:
            for level, (prev, cur) in enumerate(zip(self.previous, current)):
                units = int(max(prev.max(), cur.max())) + 1
                units = max(units, out.routing[level].probs.shape[2])
                pl_module.log(f"routing/level{level}/stability_jaccard", jaccard(prev, cur, units),
                              sync_dist=False, rank_zero_only=True)
        self.previous = current


class DiffusionRoutingStatistics(L.Callback):
    """Stage-2 router statistics (see module docstring). ``bins``: timestep bins of the logged scalars."""

    def __init__(self, bins: int = 10, every_n_epochs: int = 1):
        super().__init__()
        self.bins, self.every_n_epochs = bins, every_n_epochs
        self.spatial: dict[str, SpatialEntropyMetric] = {}

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.spatial = {b: SpatialEntropyMetric(len(getattr(pl_module, f"{b}_router").num_experts)).to(
            pl_module.device) for b in pl_module.branches}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        routing = outputs.get("routing") if isinstance(outputs, dict) else None
        for branch, r in (routing or {}).items():
            if r.spatial_maps is not None:
                self.spatial[branch].to(r.spatial_maps[0].device)
                self.spatial[branch].update(r.spatial_maps)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            for metric in self.spatial.values():
                metric.reset()
            return
        for branch, metric in self.spatial.items():
            if metric.update_count:
                for level, value in enumerate(metric.compute()):
                    pl_module.log(f"routing/{branch}/spatial_entropy/level{level}", value.float(), sync_dist=False)
            metric.reset()
        experiment = _experiment(trainer) if trainer.is_global_zero else None
        if experiment is None:
            return  # the curve is the same on every rank: rank zero writes it straight to TensorBoard
        for branch in pl_module.branches:
            router = getattr(pl_module, f"{branch}_router").temporal
            t, weights = temporal_curve(router, pl_module.time_embedding, pl_module.num_train_timesteps)
            edges = np.linspace(0, len(t), self.bins + 1).astype(int)
            for lo, hi in zip(edges[:-1], edges[1:]):
                for level, value in enumerate(weights[lo:hi].mean(0).tolist()):
                    experiment.add_scalar(f"routing/{branch}/level{level}/t{lo:03d}-{hi - 1:03d}", value,
                                          trainer.global_step)
            experiment.add_image(f"routing/{branch}/temporal_curve", curve_image(t, weights, branch),
                                 trainer.global_step, dataformats="HWC")


LEVEL_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def curve_image(t: torch.Tensor, weights: torch.Tensor, title: str, size: tuple[int, int] = (400, 240)
                ) -> np.ndarray:
    """Level weights (T, L) against timestep (T,) as an (H, W, 3) uint8 line plot (x: t from 0 to T - 1, high =
    noisy; y: weight from 0 to 1; one colour per level, level 0 = coarsest first), drawn with PIL (cheap)."""
    from PIL import Image, ImageDraw

    width, height = size
    left, right, top, bottom = 36, 10, 18, 22
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([left, top, width - right, height - bottom], outline=(0, 0, 0))
    for y in (0.0, 0.5, 1.0):
        py = height - bottom - y * (height - top - bottom)
        draw.line([left - 3, py, left, py], fill=(0, 0, 0))
        draw.text((4, py - 5), f"{y:.1f}", fill=(0, 0, 0))
    t_max = max(float(t.max()), 1.0)
    draw.text((left, height - bottom + 4), "t = 0", fill=(0, 0, 0))
    draw.text((width - right - 48, height - bottom + 4), f"t = {int(t_max)}", fill=(0, 0, 0))
    draw.text((left, 3), f"{title}: level weights vs timestep", fill=(0, 0, 0))
    xs = left + t.float().numpy() / t_max * (width - left - right)
    for level in range(weights.shape[1]):
        ys = height - bottom - weights[:, level].clamp(0, 1).numpy() * (height - top - bottom)
        colour = LEVEL_COLOURS[level % len(LEVEL_COLOURS)]
        draw.line(list(zip(xs.tolist(), ys.tolist())), fill=colour, width=2)
        draw.text((width - right - 60, top + 4 + 11 * level), f"level {level}", fill=colour)
    return np.asarray(image)
