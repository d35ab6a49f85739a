"""Bootstrap confidence intervals over images.

Every metric is a ratio of per-image sums: sum_i num_i / sum_i den_i (den_i = 1 for a plain mean; for two-way
identification num_i counts beaten distractors and den = N - 1; for retrieval num_i counts the draws in which
image i was retrieved and den_i the draws in which it was a candidate, so the point value is exactly MindEye2's
mean over draws). One replicate resamples the N images with replacement (the same resample for every metric of a
subject: a paired bootstrap) and recomputes the ratio; the interval is the 2.5th and 97.5th percentile. The
distractor set of two-way identification and the retrieval candidates are not redrawn: the interval describes the
variability of the per-image scores.
"""

from __future__ import annotations

import numpy as np


def resample_counts(n: int, replicates: int, seed: int | list[int]) -> np.ndarray:
    """(replicates, n) multiplicities of each image in each bootstrap resample."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=replicates).astype(np.float64)


def ratio(numerators: np.ndarray, denominators: np.ndarray | float = 1.0) -> float:
    den = np.broadcast_to(np.asarray(denominators, dtype=np.float64), np.shape(numerators))
    return float(np.sum(numerators) / np.sum(den))


def bootstrap_replicates(counts: np.ndarray, numerators: np.ndarray, denominators: np.ndarray | float = 1.0,
                         ) -> np.ndarray:
    """Replicates of sum(num) / sum(den) under each resample of ``counts`` -> (replicates,)."""
    num = np.asarray(numerators, dtype=np.float64)
    den = np.broadcast_to(np.asarray(denominators, dtype=np.float64), num.shape)
    return (counts @ num) / (counts @ den)


def percentile_interval(replicates: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(replicates, [tail, 100 - tail])
    return float(low), float(high)
