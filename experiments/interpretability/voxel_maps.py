"""Voxel-expert maps: which voxels drive each expert, at every level.

- Level 0 through the adapter: expert e's map is the mean over test rows (repeats averaged per image, then images)
  of sum_j gate[e, j] * |W[unit_j, :]| over the adapter units it selected (W the adapter's effective V -> H matrix,
  the product with a bottleneck). Only level 0 has such a map: from level 1 on an expert's inputs are positions in
  its parent's *output features*, not adapter units (the reference analysis indexed the adapter with them).
- Every level through integrated gradients (``attribution``): the mean over images of |attribution| (E_l, V).

Writes ``voxel_maps/`` (arrays always; NIfTI volumes in the subject's space when the ROI mask is in the metadata;
a figure per level) and, with ROI labels (synthetic data), the ROI enrichment of every expert and the agreement of
the maps with the ROIs (``agreement``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from experiments.interpretability.agreement import roi_agreement
from experiments.interpretability.attribution import Attributions, affine_adapter
from experiments.interpretability.figures import map_grid
from experiments.interpretability.loading import RoiInfo, TestSet
from experiments.interpretability.outputs import write_csv, write_nifti, write_npy, write_png
from experiments.interpretability.report import ReportItem


@torch.no_grad()
def adapter_expert_maps(weight: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor,
                        row_weights: torch.Tensor) -> torch.Tensor:
    """Level-0 maps (E, V) from the adapter ``weight`` (H, V), the level-0 routing ``indices``/``gates``
    (rows, E, k) in adapter-unit coordinates and per-row weights (rows,) summing to 1."""
    rows, experts, _ = indices.shape
    dense = torch.zeros(rows, experts, weight.shape[0], dtype=weight.dtype, device=weight.device)
    dense.scatter_add_(-1, indices, gates.to(weight.dtype))  # (rows, E, H): gate of each selected unit
    return torch.einsum("r,reh->eh", row_weights.to(device=weight.device, dtype=weight.dtype), dense) @ weight.abs()


@torch.no_grad()
def level0_adapter_maps(moe: nn.Module, adapters: nn.Module, subject: str, test: TestSet,
                        batch_rows: int = 256) -> np.ndarray:
    """(E_0, V) level-0 adapter-weight maps over every valid repeat of every test image (each image weighs 1/N,
    shared by its repeats)."""
    weight, bias = affine_adapter(adapters, subject)
    rows = test.voxels[test.repeat_mask]  # (n_rows, V)
    counts = test.repeat_mask.sum(1, keepdim=True).expand_as(test.repeat_mask)[test.repeat_mask].float()
    row_weights = 1.0 / (counts * len(test))
    total = None
    for start in range(0, len(rows), batch_rows):
        x = rows[start:start + batch_rows].to(weight.device)
        routing = moe(x @ weight.T + bias).routing[0]
        part = adapter_expert_maps(weight, routing.indices, routing.gates, row_weights[start:start + batch_rows])
        total = part if total is None else total + part
    return total.cpu().numpy()


def to_volume(values: np.ndarray, roi: RoiInfo) -> np.ndarray:
    """(K, V) voxel values -> (X, Y, Z, K) volume (zeros outside the mask)."""
    flat = np.zeros((values.shape[0], roi.mask.size), np.float32)
    flat[:, roi.voxel_positions] = values
    return np.moveaxis(flat.reshape(values.shape[0], *roi.mask.shape), 0, -1)


def projections(values: np.ndarray, roi: RoiInfo | None) -> np.ndarray:
    """(K, V) -> (K, h, w) images: maximum-intensity projections along the last axis of the volume, or, without
    a mask, the voxels in index order on a square grid."""
    if roi is not None and roi.mask is not None:
        return to_volume(np.abs(values), roi).max(2).transpose(2, 0, 1)
    side = int(np.ceil(np.sqrt(values.shape[1])))
    padded = np.full((values.shape[0], side * side), np.nan, np.float32)
    padded[:, : values.shape[1]] = values
    return padded.reshape(-1, side, side)


def roi_enrichment(maps: np.ndarray, labels: np.ndarray, names: list[str]) -> np.ndarray:
    """(E, V) non-negative maps -> (E, R) share of each expert's map mass in each ROI divided by the ROI's share of
    voxels (1 = no preference)."""
    onehot = np.eye(len(names))[labels]  # (V, R)
    mass = maps @ onehot / np.maximum(maps.sum(1, keepdims=True), 1e-12)
    return mass / np.maximum(onehot.mean(0), 1e-12)


def voxel_maps_analysis(moe: nn.Module, adapters: nn.Module, subject: str, test: TestSet, roi: RoiInfo,
                        attributions: Attributions, out_dir: Path, permutations: int = 1000, seed: int = 0,
                        ) -> list[ReportItem]:
    """Write the voxel-expert maps of every level (see module docstring); returns the report items."""
    folder = Path(out_dir) / "voxel_maps"
    items: list[ReportItem] = []
    adapter_maps = level0_adapter_maps(moe, adapters, subject, test)
    write_npy(folder / "adapter_level0.npy", adapter_maps)
    write_npy(folder / "assignment_adapter_level0.npy", adapter_maps.argmax(0).astype(np.int16))
    ig_maps = [attributions.mean_abs[attributions.columns(level)] for level in range(attributions.num_levels)]
    for level, maps in enumerate(ig_maps):
        write_npy(folder / f"ig_level{level}.npy", maps)
        write_npy(folder / f"ig_signed_level{level}.npy", attributions.mean[attributions.columns(level)])
        write_npy(folder / f"assignment_level{level}.npy", maps.argmax(0).astype(np.int16))
    overall = attributions.mean_abs[attributions.levels == -1]
    write_npy(folder / "ig_model.npy", overall[0])
    has_volume = roi.mask is not None
    if has_volume:
        write_nifti(folder / "adapter_level0.nii.gz", to_volume(adapter_maps, roi), roi.affine)
        for level, maps in enumerate(ig_maps):
            write_nifti(folder / f"ig_level{level}.nii.gz", to_volume(maps, roi), roi.affine)
            write_nifti(folder / f"assignment_level{level}.nii.gz",
                        to_volume(maps.argmax(0)[None] + 1.0, roi)[..., 0], roi.affine)
        write_nifti(folder / "ig_model.nii.gz", to_volume(overall, roi)[..., 0], roi.affine)
    figures = ["voxel_maps/adapter_level0.png"]
    if has_volume and roi.background is not None:  # a real subject: slices over its mean volume, ROI outlines
        from experiments.interpretability.slices import slice_figure

        slice_figure(overall[0], roi.mask, roi.affine, Path(out_dir) / "voxel_maps/ig_model_slices.png",
                     f"{subject}: mean |integrated gradients| of the model", background=roi.background,
                     roi_labels=roi.labels, roi_names=roi.names)
        figures.append("voxel_maps/ig_model_slices.png")
    write_png(Path(out_dir) / figures[0], map_grid(projections(adapter_maps, roi),
                                                   [f"expert {e}" for e in range(len(adapter_maps))],
                                                   "level 0: gate-weighted |adapter weights|"))
    for level, maps in enumerate(ig_maps):
        name = f"voxel_maps/ig_level{level}.png"
        write_png(Path(out_dir) / name, map_grid(projections(maps, roi), [f"expert {e}" for e in range(len(maps))],
                                                 f"level {level}: mean |integrated gradients|"))
        figures.append(name)
    space = "maximum-intensity projections of the subject's volume" if has_volume else \
        "voxels in index order (no ROI mask in the metadata, so no NIfTI volumes)"
    items.append(ReportItem(
        "Voxel-expert maps",
        f"{subject}, {len(test)} test images. Level 0 through the adapter weights of the units routed to each "
        f"expert; every level through integrated gradients ({attributions.steps} steps, zero baseline, objective "
        f"'{attributions.objective}', averaged over repeats and images; median completeness error "
        f"{attributions.completeness_error():.3f}). Figures: {space}. Arrays: voxel_maps/*.npy"
        + (", volumes: voxel_maps/*.nii.gz." if has_volume else "."), figures))
    if roi.labels is not None:
        tables = []
        for level, maps in enumerate([adapter_maps] + ig_maps):
            tag = "adapter_level0" if level == 0 else f"ig_level{level - 1}"
            enrichment = roi_enrichment(maps, roi.labels, roi.names)
            name = f"voxel_maps/roi_enrichment_{tag}.csv"
            write_csv(Path(out_dir) / name, ["expert", *roi.names],
                      [[e, *row] for e, row in enumerate(enrichment.tolist())])
            tables.append(name)
        results = roi_agreement(ig_maps, roi.labels, roi.names, permutations, seed)
        adapter = roi_agreement([adapter_maps], roi.labels, roi.names, permutations, seed)[0]
        adapter.name = "level 0 adapter-weight argmax expert"
        rows = [[r.name, r.ami, r.null_p99, r.p_value, r.voxels, r.above_null, float(r.null.mean()),
                 float(r.null.std())] for r in [adapter, *results]]
        write_csv(Path(out_dir) / "voxel_maps/roi_agreement.csv",
                  ["assignment", "ami", "null_p99", "p_value", "voxels", "above_null_p99", "null_mean", "null_sd"],
                  rows)
        primary = results[-1]
        items.append(ReportItem(
            "Agreement with the ground-truth ROIs",
            f"Adjusted mutual information between voxel assignments from the maps and the ROI labels of the "
            f"metadata (unresponsive voxels left out), against {permutations} permutations of the assignment. "
            f"All-level clustering: AMI {primary.ami:.3f}, null 99th percentile {primary.null_p99:.3f}. Enrichment "
            "tables: each expert's share of map mass per ROI over the ROI's share of voxels.",
            tables=["voxel_maps/roi_agreement.csv", *tables]))
    return items
