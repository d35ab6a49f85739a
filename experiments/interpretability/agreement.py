"""Agreement between voxel-expert maps and known ROI labels: adjusted mutual information (AMI) of a voxel
assignment with the labels, against a permutation null (the assignment shuffled over voxels).

Assignments: per level, each voxel's argmax expert of the map (E_l, V); and one clustering of all levels together
(k-means, k = number of ROI labels, on each voxel's profile of per-level expert shares: every level's map column
divided by its sum, so a voxel's overall gain cancels). Voxels labelled ``unresponsive`` are left out: they carry no
signal, and their near-zero maps would reward any map that is small where the data is noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_mutual_info_score


@dataclass
class Agreement:
    """AMI of one assignment with the ROI labels, the permutation null's 99th percentile and the permutation
    p-value ((1 + #null >= ami) / (1 + permutations))."""

    name: str
    ami: float
    null_p99: float
    p_value: float
    voxels: int
    null: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))

    @property
    def above_null(self) -> bool:
        return self.ami > self.null_p99


def mutual_information(truth: np.ndarray, assignments: np.ndarray) -> np.ndarray:
    """MI (nats) of ``truth`` (n,) with each row of ``assignments`` (P, n), both small non-negative ints, from
    one vectorised contingency count."""
    ku, kv = int(truth.max()) + 1, int(assignments.max()) + 1
    p, n = assignments.shape
    codes = (truth[None] * kv + assignments) + (np.arange(p) * ku * kv)[:, None]
    joint = np.bincount(codes.ravel(), minlength=p * ku * kv).reshape(p, ku, kv) / n
    outer = joint.sum(2, keepdims=True) * joint.sum(1, keepdims=True)
    ratio = np.where(joint > 0, joint / np.where(outer > 0, outer, 1), 1)
    return (joint * np.log(ratio)).sum((1, 2))


def permutation_agreement(name: str, assignment: np.ndarray, labels: np.ndarray, permutations: int = 1000,
                          seed: int = 0) -> Agreement:
    """AMI(labels, assignment) (scikit-learn, arithmetic normalisation) against ``permutations`` shuffles of the
    assignment over voxels. Shuffling keeps both marginals, hence the entropies and the expected MI, so every
    null AMI is (MI - EMI) / (mean entropy - EMI) with one vectorised MI per shuffle; EMI comes from scikit-learn's
    AMI of one shuffle."""
    _, truth = np.unique(labels, return_inverse=True)
    _, assigned = np.unique(assignment, return_inverse=True)
    value = adjusted_mutual_info_score(truth, assigned)
    shuffled = shuffles(assigned, permutations + 1, seed)
    if truth.max() == 0 or assigned.max() == 0:
        null = np.zeros(permutations)
    else:
        mi = mutual_information(truth, shuffled)
        entropy = lambda x: float(-(np.bincount(x) / len(x) * np.log(np.bincount(x) / len(x))).sum())  # noqa: E731
        mean_h = (entropy(truth) + entropy(assigned)) / 2
        first = adjusted_mutual_info_score(truth, shuffled[0])
        emi = (mi[0] - first * mean_h) / (1 - first)
        null = (mi[1:] - emi) / (mean_h - emi)
    return Agreement(name, float(value), float(np.percentile(null, 99)),
                     float((1 + (null >= value).sum()) / (1 + permutations)), int(len(labels)), null)


def shuffles(assignment: np.ndarray, count: int, seed: int) -> np.ndarray:
    """(count, n) independent permutations of ``assignment`` (n,); the first is only used to find the EMI."""
    return np.random.default_rng(seed).permuted(np.tile(assignment, (count, 1)), axis=1)


def share_profile(maps: list[np.ndarray]) -> np.ndarray:
    """Per-level maps [(E_l, V)] of non-negative values -> (V, sum E_l): each level's column as shares."""
    return np.concatenate([m / np.maximum(m.sum(0, keepdims=True), 1e-12) for m in maps], 0).T


def roi_agreement(maps: list[np.ndarray], labels: np.ndarray, names: list[str], permutations: int = 1000,
                  seed: int = 0) -> list[Agreement]:
    """Per-level argmax assignments and the all-level clustering (see module docstring) against the ROI
    ``labels`` (V,) (indices into ``names``); the clustering comes last."""
    keep = labels != names.index("unresponsive") if "unresponsive" in names else np.ones(len(labels), bool)
    truth = labels[keep]
    results = [permutation_agreement(f"level {level} argmax expert", m.argmax(0)[keep], truth, permutations,
                                     seed + level) for level, m in enumerate(maps)]
    k = len(np.unique(truth))
    clusters = KMeans(k, n_init=10, random_state=seed).fit_predict(share_profile(maps)[keep])
    results.append(permutation_agreement(f"all levels, k-means (k = {k})", clusters, truth, permutations, seed))
    return results
