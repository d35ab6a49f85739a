"""Temporal routing of a trained stage-2 model: each branch's router level weights at every timestep.

The curves are the routers' own outputs (``lightning_modules.metrics.temporal_curve``: the UNet's timestep sinusoid ->
``TemporalRouter``), nothing multiplied in. The authors' plot (``nbs/viz_routers.py``, ``multiply_prior=True``)
multiplied a hand-made Gaussian into the router weights, so its coarse-to-fine pattern came from the Gaussian; here
the KL target (``level_prior.gaussian_level_target`` with the module's KL settings) is computed separately and drawn
in its own panel beside the router's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from experiments.interpretability.loading import InterpretabilityInputError
from experiments.interpretability.outputs import write_csv, write_npz, write_png
from experiments.interpretability.report import ReportItem
from lightning_modules.components.level_prior import gaussian_level_target, level_kl
from lightning_modules.metrics import temporal_curve


def kl_target(module, timesteps: torch.Tensor, num_levels: int) -> torch.Tensor:
    """(T,) timesteps -> (T, L) the Gaussian level target the module's KL term uses (its ``kl_*`` settings)."""
    h, total = module.hparams, module.num_train_timesteps
    t_hi = h.kl_t_hi if h.kl_t_hi is not None else total
    return gaussian_level_target(timesteps, num_levels, h.kl_sigma, h.kl_t_lo, t_hi, h.kl_direction, total)


@torch.no_grad()
def temporal_arrays(module) -> dict[str, np.ndarray]:
    """Every branch's router at t = 0..T-1: ``timesteps`` (T,), ``{branch}_weights`` (T, L) (what mixes the levels),
    ``{branch}_probs`` (T, L) (the learned softmax the KL sees; learned routers only), ``{branch}_target`` (T, L)."""
    out: dict[str, np.ndarray] = {}
    for branch in module.branches:
        router = getattr(module, f"{branch}_router").temporal
        t, weights = temporal_curve(router, module.time_embedding, module.num_train_timesteps)
        out["timesteps"] = t.numpy()
        out[f"{branch}_weights"] = weights.numpy()
        if router.learned:
            emb = module.time_embedding(t.to(module.device)).float()
            out[f"{branch}_probs"] = router.probabilities(emb).float().cpu().numpy()
        out[f"{branch}_target"] = kl_target(module, t, weights.shape[1]).numpy()
    return out


def bin_means(values: np.ndarray, num_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """(T, L) -> bin edges (num_bins + 1,) over 0..T and the mean of each bin (num_bins, L)."""
    edges = np.linspace(0, len(values), num_bins + 1).round().astype(int)
    sums = np.add.reduceat(values, edges[:-1], axis=0)
    return edges, sums / np.diff(edges)[:, None]


def temporal_figure(arrays: dict[str, np.ndarray], branches: list[str]) -> np.ndarray:
    """(H, W, 3) uint8: one row per branch, panels [router level weights | router softmax (hard routers) |
    KL target], each from ``arrays`` alone (``curve_image``)."""
    from callbacks.routing_statistics import curve_image  # the training callback's plot (Lightning module)

    t = torch.from_numpy(arrays["timesteps"])
    rows = []
    for branch in branches:
        panels = [curve_image(t, torch.from_numpy(arrays[f"{branch}_weights"]), f"{branch} router")]
        probs = arrays.get(f"{branch}_probs")
        if probs is not None and not np.array_equal(probs, arrays[f"{branch}_weights"]):
            panels.append(curve_image(t, torch.from_numpy(probs), f"{branch} router softmax"))
        panels.append(curve_image(t, torch.from_numpy(arrays[f"{branch}_target"]), "KL target (not in router)"))
        rows.append(np.concatenate(panels, 1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return np.concatenate(rows, 0)


def write_tables(arrays: dict[str, np.ndarray], branches: list[str], out_dir: Path) -> None:
    """``temporal_routing.csv`` (one row per timestep: every branch's weights and target) and
    ``temporal_routing_bins.csv`` (one row per branch and bin)."""
    header, columns = ["t"], [arrays["timesteps"][:, None]]
    for branch in branches:
        for kind in ("weights", "target"):
            values = arrays[f"{branch}_{kind}"]
            header += [f"{branch}_{kind}_level{lvl}" for lvl in range(values.shape[1])]
            columns.append(values)
    write_csv(out_dir / "temporal_routing.csv", header, np.concatenate(columns, 1).tolist())
    edges, rows = arrays["bin_edges"], []
    for branch in branches:
        w, p = arrays[f"{branch}_weights_binned"], arrays[f"{branch}_target_binned"]
        rows += [[branch, int(lo), int(hi) - 1, *w[b].tolist(), *p[b].tolist()]
                 for b, (lo, hi) in enumerate(zip(edges[:-1], edges[1:]))]
    levels = arrays[f"{branches[0]}_weights"].shape[1]
    write_csv(out_dir / "temporal_routing_bins.csv",
              ["branch", "t_first", "t_last", *[f"weight_level{lvl}" for lvl in range(levels)],
               *[f"target_level{lvl}" for lvl in range(levels)]], rows)


def report_text(module, arrays: dict[str, np.ndarray], branches: list[str], num_bins: int) -> str:
    h = module.hparams
    t_hi = h.kl_t_hi if h.kl_t_hi is not None else module.num_train_timesteps
    modes = ", ".join(f"{b}: {getattr(module, f'{b}_router').temporal.mode}" for b in branches)
    kls = [f"{b} {level_kl(torch.from_numpy(arrays[f'{b}_probs']), torch.from_numpy(arrays[f'{b}_target'])):.4f}"
           for b in branches if f"{b}_probs" in arrays]
    return (f"Level weights of each branch's temporal router ({modes}) at every training timestep t = 0.."
            f"{len(arrays['timesteps']) - 1} (high t = noisy; level 0 = coarsest), computed from the router alone: "
            "the UNet's timestep sinusoid into the trained router, nothing multiplied in."
            f"\n\nThe KL target (Gaussian over levels, sigma {h.kl_sigma}, direction {h.kl_direction}, t_lo "
            f"{h.kl_t_lo}, t_hi {t_hi}, training weight {h.kl_weight}) is drawn in its own panel; it is not part of "
            "the router's output."
            + (f"\n\nKL(router || target) averaged over all timesteps: {', '.join(kls)}." if kls else "")
            + f"\n\nFull-resolution arrays: temporal_routing.npz and temporal_routing.csv; {num_bins} bin means "
            "below.")


def temporal_routing(module, out_dir: Path, num_bins: int = 20) -> list[ReportItem]:
    """Writes ``temporal_routing.npz`` (full-resolution arrays of ``temporal_arrays`` plus ``bin_edges`` and
    ``{branch}_weights_binned`` / ``{branch}_target_binned`` (num_bins, L)), ``temporal_routing.csv`` (one row per
    timestep), ``temporal_routing_bins.csv`` and ``temporal_routing.png``; returns the report items."""
    out_dir = Path(out_dir)
    if num_bins < 1:
        raise InterpretabilityInputError(f"--bins must be at least 1, got {num_bins}")
    branches = list(module.branches)
    arrays = temporal_arrays(module)
    num_bins = min(num_bins, len(arrays["timesteps"]))
    for branch in branches:
        for kind in ("weights", "target"):
            arrays["bin_edges"], arrays[f"{branch}_{kind}_binned"] = bin_means(arrays[f"{branch}_{kind}"], num_bins)
    write_npz(out_dir / "temporal_routing.npz", **arrays)
    write_tables(arrays, branches, out_dir)
    write_png(out_dir / "temporal_routing.png", temporal_figure(arrays, branches))
    return [ReportItem("Temporal routing", report_text(module, arrays, branches, num_bins),
                       ["temporal_routing.png"], ["temporal_routing_bins.csv"])]
