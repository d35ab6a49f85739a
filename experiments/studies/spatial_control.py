"""The spatial positive control's statistic: do the cells that hold the object route to retinotopic experts?

For one branch and level: routing maps ``W`` (N, S, G, E) (N images, S denoising steps, G = g x g cells, E
experts; each cell's weights sum to 1), the level's retinotopic experts ``retinotopic`` (E,) bool and each
image's object ``coverage`` (N, G) (the share of each cell's pixels the object covers). Per image the retinotopic
mass of a cell, m = sum over retinotopic experts of W (N, S, G), is contrasted between the object and the
background: the coverage-weighted mean of m over the cells the object touches minus the plain mean over the cells
it does not touch (``contrasts``: K (N, G), each row sums to 0). The statistic is the mean over images (and the
steps of a bin) of m . K: positive when the object's cells give more of their routing to retinotopic experts.

Null: the object masks shuffled across images within each subject (seeded), so every image keeps its own routing,
and the router's fixed preferences per cell (the objects lie near the centre) are kept in the null; one-sided
p = (1 + #(null >= observed)) / (1 + permutations), z = (observed - null mean) / null sd.

``planted_routing`` / ``random_routing`` build routing with and without a link to the objects (for the unit test,
and for the study's own calibration and detection checks with its real masks and expert labels).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ControlResult:
    """Observed statistic per step bin (B,) and pooled over every step (``all``), its permutation null (P, B) /
    (P,), one-sided p-values and z-scores."""

    observed: np.ndarray
    null: np.ndarray
    observed_all: float
    null_all: np.ndarray

    @staticmethod
    def _p(observed, null) -> np.ndarray:
        return (1 + (null >= observed).sum(0)) / (1 + len(null))

    @staticmethod
    def _z(observed, null) -> np.ndarray:
        return (observed - null.mean(0)) / np.maximum(null.std(0), 1e-12)

    @property
    def p(self) -> np.ndarray:
        return self._p(self.observed, self.null)

    @property
    def z(self) -> np.ndarray:
        return self._z(self.observed, self.null)

    @property
    def p_all(self) -> float:
        return float(self._p(self.observed_all, self.null_all))

    @property
    def z_all(self) -> float:
        return float(self._z(self.observed_all, self.null_all))


def contrasts(coverage: np.ndarray) -> np.ndarray:
    """(N, G) object coverage in [0, 1] -> (N, G) contrast: coverage / its sum minus (uncovered cells) / their
    count. An image whose object touches every cell (or none) has no background (or object): its row is 0."""
    coverage = np.asarray(coverage, np.float64)
    background = (coverage <= 0).astype(np.float64)
    obj_sum, bg_sum = coverage.sum(1, keepdims=True), background.sum(1, keepdims=True)
    valid = (obj_sum > 0) & (bg_sum > 0)
    return np.where(valid, coverage / np.maximum(obj_sum, 1e-12) - background / np.maximum(bg_sum, 1e-12), 0.0)


def retinotopic_mass(maps: np.ndarray, retinotopic: np.ndarray) -> np.ndarray:
    """(N, S, G, E) routing, (E,) bool -> (N, S, G) the weight each cell gives to the retinotopic experts."""
    return maps @ np.asarray(retinotopic, np.float64)


def permutations(groups: np.ndarray, count: int, seed: int) -> np.ndarray:
    """(count, N) permutations of 0..N-1 that move images only within their group (subject) -> the null's image
    order; seeded."""
    groups = np.asarray(groups)
    rng = np.random.default_rng(seed)
    out = np.tile(np.arange(len(groups)), (count, 1))
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g)
        out[:, members] = members[rng.permuted(np.tile(np.arange(len(members)), (count, 1)), axis=1)]
    return out


def step_bins(num_steps: int, bins: int) -> list[np.ndarray]:
    """Consecutive denoising-step index groups (noisy first, as the sampler runs), at most ``bins``."""
    return [b for b in np.array_split(np.arange(num_steps), min(bins, num_steps)) if len(b)]


def control_test(mass: np.ndarray, contrast: np.ndarray, perms: np.ndarray, bins: list[np.ndarray]
                 ) -> ControlResult:
    """(N, S, G) retinotopic mass, (N, G) contrasts, (P, N) permutations, step bins -> ``ControlResult``."""
    per_bin = np.stack([mass[:, b].mean(1) for b in bins], 1)  # (N, B, G)
    observed = np.einsum("nbg,ng->b", per_bin, contrast) / len(mass)
    null = np.einsum("nbg,png->pb", per_bin, contrast[perms], optimize=True) / len(mass)
    overall = mass.mean(1)  # (N, G)
    observed_all = float(np.einsum("ng,ng->", overall, contrast) / len(mass))
    null_all = np.einsum("ng,png->p", overall, contrast[perms], optimize=True) / len(mass)
    return ControlResult(observed, null, observed_all, null_all)


def expert_contrasts(maps: np.ndarray, contrast: np.ndarray) -> np.ndarray:
    """(N, S, G, E) routing, (N, G) contrasts -> (E,) each expert's object-minus-background weight (all steps)."""
    return np.einsum("nge,ng->e", maps.mean(1), contrast) / len(maps)


def random_routing(rng: np.random.Generator, shape: tuple[int, int, int, int], bias: np.ndarray | None = None,
                   noise: float = 1.0) -> np.ndarray:
    """(N, S, G, E) routing with no link to any object: softmax of ``bias`` (S, G, E) logits (e.g. the log of a
    learned router's mean map, so its fixed cell preferences stay) plus Gaussian noise of sd ``noise`` per image."""
    logits = rng.normal(0.0, noise, shape)
    if bias is not None:
        logits = logits + bias
    logits -= logits.max(-1, keepdims=True)
    w = np.exp(logits)
    return w / w.sum(-1, keepdims=True)


def planted_routing(base: np.ndarray, coverage: np.ndarray, retinotopic: np.ndarray, strength: float
                    ) -> np.ndarray:
    """Routing ``base`` (N, S, G, E) with the object planted: in each cell a share ``strength`` x coverage of its
    weight moves to the retinotopic experts (evenly); rows still sum to 1."""
    target = np.asarray(retinotopic, np.float64) / max(int(np.sum(retinotopic)), 1)
    share = (strength * np.asarray(coverage, np.float64))[:, None, :, None]  # (N, 1, G, 1)
    return (1 - share) * base + share * target
