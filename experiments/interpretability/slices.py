"""Slices of a voxel map in the subject's own space: the map over the subject's mean volume (or its voxel mask)
with ROI outlines, drawn by nilearn's plotting as the field does, beside the maximum-intensity projections."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from datamodules.common import atomic_path


def slice_figure(values: np.ndarray, mask: np.ndarray, affine: np.ndarray, path: Path, title: str, *,
                 background: np.ndarray | None = None, roi_labels: np.ndarray | None = None,
                 roi_names: list[str] | None = None, max_outlines: int = 8, cuts: int = 6) -> Path:
    """Axial slices of ``values`` (V,), placed at the mask's positive voxels (C order), over ``background`` (the
    subject's mean volume; the mask when absent), with outlines of the ``max_outlines`` largest ROIs of
    ``roi_labels`` (V,) (label 0 = none). Written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib
    from nilearn import plotting

    positions = np.flatnonzero(mask.reshape(-1) > 0)
    volume = np.zeros(mask.size, np.float32)
    volume[positions] = values
    stat = nib.Nifti1Image(volume.reshape(mask.shape), affine)
    bg = nib.Nifti1Image(np.asarray(background if background is not None else (mask > 0), np.float32), affine)
    figure = plt.figure(figsize=(2.0 * cuts, 2.6))
    display = plotting.plot_stat_map(stat, bg_img=bg, display_mode="z", cut_coords=cuts, figure=figure,
                                     title=title, colorbar=True, black_bg=False, draw_cross=False,
                                     annotate=False, threshold=float(np.percentile(np.abs(values), 50)))
    if roi_labels is not None and roi_names:
        counts = np.bincount(roi_labels, minlength=len(roi_names))
        counts[0] = 0
        colours = plt.get_cmap("tab10")
        for k, label in enumerate(np.argsort(counts)[::-1][:max_outlines]):
            if counts[label] == 0:
                break
            outline = np.zeros(mask.size, np.float32)
            outline[positions[roi_labels == label]] = 1
            display.add_contours(nib.Nifti1Image(outline.reshape(mask.shape), affine), levels=[0.5],
                                 colors=[colours(k % 10)], linewidths=0.8)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=80)
    plt.close(figure)
    return Path(path)
