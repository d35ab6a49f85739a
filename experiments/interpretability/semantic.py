"""Semantic preferences: what each expert (and, with ROI labels, each ROI) prefers among the COCO super-categories
of the test images, and the most important root-to-leaf expert path per image and per category.

Scores per image and expert (N, J):
- ``attribution``: the sum over voxels of the expert's integrated-gradients attribution (~ its objective at the
  image minus at zero voxels, by completeness); importance: the sum of |attribution| (the reference's choice);
- ``contribution``: the expert's objective itself (its clip head along the image's target); importance: |score|.
Preference of expert e for category c: the selectivity index of its importance,
``(mean over images with c - mean over images without c) / (sum of the two)`` in [-1, 1] (0: no preference); one
heatmap per level. The mean signed score per category is written beside it. ROI preference (when the metadata has
ROI labels): the same index on each ROI's mean |attribution| of the whole model. (A standardised difference, divided
by the std over all images, penalises exactly the bimodal response of a selective region and let noise regions
outrank it on short fits; the index does not.)

Paths: from the root, the level-0 expert of largest importance, then at every level the most important *child of
the chosen expert* (children from the routing tree's ``parent`` indices, not assumed), down to a leaf; per
category the most frequent path among its images. Categories come from the data, none are hard-coded.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Literal

import numpy as np

from experiments.interpretability.figures import heatmap
from experiments.interpretability.loading import RoiInfo, TestSet
from experiments.interpretability.outputs import write_csv, write_json, write_npy, write_png
from experiments.interpretability.report import ReportItem

Score = Literal["attribution", "contribution"]


def category_matrix(categories: list[list[str]]) -> tuple[np.ndarray, list[str]]:
    """Per-image category lists -> (N, C) bool membership and the sorted category names present."""
    names = sorted({c for cats in categories for c in cats})
    member = np.array([[c in cats for c in names] for cats in categories], bool).reshape(len(categories),
                                                                                            len(names))
    return member, names


def category_means(values: np.ndarray, member: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, K) values and (N, C) membership -> means over images with and without each category, (K, C) each
    (NaN where a category holds no image, or all)."""
    inside = member.sum(0)
    mean_in = values.T @ member / np.where(inside > 0, inside, np.nan)
    mean_out = values.T @ ~member / np.where(len(member) - inside > 0, len(member) - inside, np.nan)
    return mean_in, mean_out


def selectivity(values: np.ndarray, member: np.ndarray) -> np.ndarray:
    """(N, K) non-negative values -> (K, C) selectivity index (in - out) / (in + out) of each category."""
    mean_in, mean_out = category_means(values, member)
    return (mean_in - mean_out) / np.maximum(mean_in + mean_out, 1e-30)


def greedy_paths(importance: np.ndarray, levels: np.ndarray, parents: list[np.ndarray]) -> np.ndarray:
    """(N, J) importance, (J,) level of each column (-1: not an expert) and the parent index of every expert per
    level -> (N, L) expert index chosen at each level: level 0's argmax, then the argmax among the children of
    the expert chosen one level up."""
    n = len(importance)
    chosen = np.zeros((n, len(parents)), np.int64)
    for level, parent in enumerate(parents):
        scores = importance[:, levels == level]  # (N, E_l)
        allowed = np.ones_like(scores, bool) if level == 0 else parent[None, :] == chosen[:, level - 1, None]
        chosen[:, level] = np.where(allowed, scores, -np.inf).argmax(1)
    return chosen


def path_label(path: np.ndarray) -> str:
    return "-".join(str(int(e)) for e in path)


def semantic_analysis(scores: np.ndarray, importance: np.ndarray, levels: np.ndarray, parents: list[np.ndarray],
                      test: TestSet, out_dir: Path, score: Score, roi: RoiInfo | None = None,
                      overall: np.ndarray | None = None) -> list[ReportItem]:
    """scores / importance: (N, J) per image and column (``levels`` (J,), -1 for the whole model); ``parents``:
    per level (E_l,) parent expert indices; ``overall``: (N, V) per-image attribution of the whole model (for the
    ROI preferences). Writes ``semantic/``; returns the report items."""
    folder, out_dir = Path(out_dir) / "semantic", Path(out_dir)
    member, names = category_matrix(test.categories)
    if not names:
        return [ReportItem("Semantic preferences", "The test images carry no categories (import with "
                                                   "--coco-categories); nothing to compute.")]
    num_levels = len(parents)
    figures, tables = [], []
    write_csv(folder / "category_counts.csv", ["category", "images"],
              [[c, int(k)] for c, k in zip(names, member.sum(0))])
    tables.append("semantic/category_counts.csv")
    for level in range(num_levels):
        pref = selectivity(importance[:, levels == level], member)
        signed, _ = category_means(scores[:, levels == level], member)
        write_npy(folder / f"selectivity_level{level}.npy", pref)
        write_csv(folder / f"selectivity_level{level}.csv", ["expert", *names],
                  [[e, *row] for e, row in enumerate(pref.tolist())])
        write_csv(folder / f"mean_score_level{level}.csv", ["expert", *names],
                  [[e, *row] for e, row in enumerate(signed.tolist())])
        write_png(folder / f"selectivity_level{level}.png",
                  heatmap(pref, [f"expert {e}" for e in range(len(pref))], names,
                          f"level {level}: {score} selectivity per category"))
        figures.append(f"semantic/selectivity_level{level}.png")
        tables += [f"semantic/selectivity_level{level}.csv", f"semantic/mean_score_level{level}.csv"]
    paths = greedy_paths(importance, levels, parents)
    labels = [path_label(p) for p in paths]
    write_npy(folder / "paths.npy", paths)
    write_csv(folder / "paths_per_image.csv", ["nsd_id", "categories", "path", *[f"level{lv}" for lv in
                                                                               range(num_levels)]],
              [[int(i), ";".join(c), lab, *p.tolist()] for i, c, lab, p in zip(test.nsd_id, test.categories,
                                                                                labels, paths)])
    per_category = []
    for k, name in enumerate(names):
        counts = Counter(lab for lab, m in zip(labels, member[:, k]) if m)
        top, freq = counts.most_common(1)[0]
        per_category.append([name, top, freq, int(member[:, k].sum()), freq / member[:, k].sum()])
    write_csv(folder / "paths_per_category.csv", ["category", "most_frequent_path", "count", "images", "fraction"],
              per_category)
    tables += ["semantic/paths_per_category.csv", "semantic/paths_per_image.csv"]
    leaves = paths[:, -1]
    num_leaves = int((levels == num_levels - 1).sum())
    leaf_counts = np.stack([np.bincount(leaves[member[:, k]], minlength=num_leaves) for k in range(len(names))], 1)
    write_png(folder / "leaf_by_category.png", heatmap(leaf_counts.astype(float), [f"leaf {e}" for e in
                                                                                   range(num_leaves)], names,
                                                       "images whose greedy path ends at each leaf",
                                                       diverging=False))
    figures.append("semantic/leaf_by_category.png")
    items = [ReportItem(
        "Semantic preferences",
        f"Per expert and COCO super-category: selectivity index (in - out) / (in + out) of the expert's importance "
        f"({'sum of |attribution|' if score == 'attribution' else '|contribution|'}) between images with and "
        f"without the category ({len(test)} test images); the mean signed {score} per category beside it. Paths: greedy root-to-leaf descent by "
        f"{'sum of |attribution|' if score == 'attribution' else '|contribution|'}, following each expert's own "
        "children; per category the most frequent path.", figures, tables)]
    if roi is not None and roi.labels is not None and overall is not None:
        onehot = np.eye(len(roi.names))[roi.labels]
        per_roi = np.abs(overall) @ onehot / np.maximum(onehot.sum(0), 1)  # (N, R) mean |attribution| per ROI
        present = onehot.sum(0) > 0
        pref = selectivity(per_roi[:, present], member)
        roi_names = [n for n, p in zip(roi.names, present) if p]
        write_npy(folder / "roi_selectivity.npy", pref)
        write_csv(folder / "roi_selectivity.csv", ["roi", *names], [[r, *row] for r, row in zip(roi_names,
                                                                                                 pref.tolist())])
        ranking = {c: [roi_names[i] for i in np.argsort(-np.nan_to_num(pref[:, k], nan=-np.inf))]
                   for k, c in enumerate(names)}
        write_json(folder / "roi_ranking.json", ranking)
        write_png(folder / "roi_selectivity.png", heatmap(pref, roi_names, names,
                                                         "ROI selectivity (mean |attribution| of the model)"))
        top = "; ".join(f"{c}: {r[0]}" for c, r in ranking.items())
        items.append(ReportItem("ROI selectivity",
                                "Per ROI of the metadata: selectivity index of the ROI's mean |attribution| (whole "
                                "model) between images with and without each category. "
                                f"First-ranked ROI per category: {top}.",
                                ["semantic/roi_selectivity.png"], ["semantic/roi_selectivity.csv"]))
    return items
