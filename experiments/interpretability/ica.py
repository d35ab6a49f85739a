"""ICA of the per-image attribution maps, with per-category loading statistics.

Input: the whole model's integrated-gradients map of every test image (N, V). Each image's map is divided by its
own standard deviation (what the reference's scaling meant to do). Spatial ICA (scikit-learn ``FastICA``, unit-
variance whitening): voxels are the samples, so the components are independent spatial maps (K, V) and the mixing
matrix gives every image's loading on every component (N, K). Signs are fixed so that each map's largest absolute
value is positive. Per component and category: mean loading of images with and without the category, Welch's
t-test, and Benjamini-Hochberg FDR over all component x category tests.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from scipy import stats

from experiments.interpretability.figures import heatmap, map_grid
from experiments.interpretability.loading import RoiInfo, TestSet
from experiments.interpretability.outputs import write_csv, write_nifti, write_npy, write_png
from experiments.interpretability.report import ReportItem
from experiments.interpretability.semantic import category_matrix
from experiments.interpretability.voxel_maps import projections, to_volume


def spatial_ica(maps: np.ndarray, components: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(N, V) per-image maps -> spatial maps (K, V) and loadings (N, K), K = min(components, N - 1)."""
    from sklearn.decomposition import FastICA

    scaled = maps / np.maximum(maps.std(1, keepdims=True), 1e-12)
    k = max(1, min(components, len(maps) - 1))
    ica = FastICA(n_components=k, whiten="unit-variance", random_state=seed, max_iter=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings on tiny data are reported through the fit itself
        sources = ica.fit_transform(scaled.T)  # (V, K)
    loadings = ica.mixing_  # (N, K)
    peak = np.take_along_axis(sources, np.abs(sources).argmax(0)[None], 0)[0]
    sign = np.where(peak < 0, -1.0, 1.0)
    return (sources * sign).T, loadings * sign


def loading_statistics(loadings: np.ndarray, member: np.ndarray, names: list[str]) -> list[dict]:
    """Welch t-tests of the loadings (N, K) of images with vs without each category (N, C), FDR-BH corrected."""
    rows = []
    for k in range(loadings.shape[1]):
        for c, name in enumerate(names):
            inside, outside = loadings[member[:, c], k], loadings[~member[:, c], k]
            if len(inside) >= 2 and len(outside) >= 2:
                t, p = stats.ttest_ind(inside, outside, equal_var=False)
            else:
                t, p = np.nan, np.nan
            rows.append({"component": k, "category": name, "images_in": len(inside), "images_out": len(outside),
                         "mean_in": float(inside.mean()) if len(inside) else np.nan,
                         "mean_out": float(outside.mean()) if len(outside) else np.nan,
                         "t": float(t), "p": float(p)})
    p = np.array([r["p"] for r in rows])
    q = np.full(len(p), np.nan)
    finite = np.isfinite(p)
    if finite.any():
        q[finite] = stats.false_discovery_control(p[finite], method="bh")
    for r, value in zip(rows, q):
        r["q_fdr_bh"] = float(value)
    return rows


def ica_analysis(overall: np.ndarray, test: TestSet, roi: RoiInfo, out_dir: Path, components: int = 8,
                 seed: int = 0) -> list[ReportItem]:
    """Writes ``ica/`` (maps, loadings, category statistics, figures, NIfTI maps when the mask is known)."""
    folder = Path(out_dir) / "ica"
    maps, loadings = spatial_ica(overall, components, seed)
    write_npy(folder / "spatial_maps.npy", maps)
    write_npy(folder / "loadings.npy", loadings)
    write_csv(folder / "loadings.csv", ["nsd_id", "categories", *[f"ic{k}" for k in range(len(maps))]],
              [[int(i), ";".join(c), *row] for i, c, row in zip(test.nsd_id, test.categories, loadings.tolist())])
    if roi.mask is not None:
        write_nifti(folder / "spatial_maps.nii.gz", to_volume(maps, roi), roi.affine)
    write_png(folder / "spatial_maps.png", map_grid(projections(maps, roi), [f"IC {k}" for k in range(len(maps))],
                                                    "independent components (|map|)"))
    figures, tables = ["ica/spatial_maps.png"], ["ica/loadings.csv"]
    member, names = category_matrix(test.categories)
    text = (f"Spatial FastICA of the whole model's per-image attribution maps ({len(test)} images, each divided "
            f"by its std), {len(maps)} components.")
    if names:
        rows = loading_statistics(loadings, member, names)
        header = ["component", "category", "images_in", "images_out", "mean_in", "mean_out", "t", "p", "q_fdr_bh"]
        write_csv(folder / "category_statistics.csv", header, [[r[h] for h in header] for r in rows])
        t = np.array([r["t"] for r in rows]).reshape(len(maps), len(names))
        write_png(folder / "category_t.png", heatmap(t, [f"IC {k}" for k in range(len(maps))], names,
                                                     "Welch t of loadings, images with vs without category"))
        figures.append("ica/category_t.png")
        tables.insert(0, "ica/category_statistics.csv")
        significant = sum(1 for r in rows if r["q_fdr_bh"] < 0.05)
        text += f" Category effects with FDR-BH q < 0.05: {significant} of {len(rows)} tests."
    if roi.labels is not None:
        onehot = np.eye(len(roi.names))[roi.labels]
        per_roi = np.abs(maps) @ onehot / np.maximum(onehot.sum(0), 1)
        write_csv(folder / "roi_mean_abs_map.csv", ["component", *roi.names],
                  [[k, *row] for k, row in enumerate(per_roi.tolist())])
        tables.append("ica/roi_mean_abs_map.csv")
    return [ReportItem("ICA of the attribution maps", text, figures, tables)]
