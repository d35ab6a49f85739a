"""Two-way identification, exactly as MindEye2's ``two_way_identification``.

Features of the N ground-truth images and the N reconstructions (same order) are flattened; R[i, j] is the
Pearson correlation of GT i with reconstruction j (``np.corrcoef(gt, rec)[:N, N:]``). For each reconstruction j,
count the GT images i with R[i, j] < R[j, j] (its own GT is never counted: R[j, j] < R[j, j] is false); the score
of j is count / (N - 1) and the metric is the mean over j: every reconstruction against all N - 1 distractors,
chance 50%. Pearson, not cosine, for every network including CLIP.

Computed streaming: the GT features are z-scored once (float64, kept on the compute device), each batch of
reconstruction features fills its columns of R. NaN correlations (a constant feature vector) compare false, as
in numpy.
"""

from __future__ import annotations

import numpy as np
import torch


def zscore_rows(features: torch.Tensor) -> torch.Tensor:
    """(B, d) -> float64 rows with zero mean and unit norm, so that ``a @ b.T`` is the Pearson correlation."""
    x = features.double().flatten(1)
    x = x - x.mean(1, keepdim=True)
    return x / x.norm(dim=1, keepdim=True)


class TwoWayIdentification:
    """Accumulates GT features (``add_reference``, in order), then reconstruction batches (``add_candidates``, in
    the same order); ``per_image()`` returns (count of beaten distractors per reconstruction, N - 1)."""

    def __init__(self) -> None:
        self._chunks: list[torch.Tensor] = []
        self._reference: torch.Tensor | None = None
        self._counts: list[np.ndarray] = []
        self._seen = 0

    def add_reference(self, features: torch.Tensor) -> None:
        self._chunks.append(zscore_rows(features))

    def add_candidates(self, features: torch.Tensor) -> None:
        if self._reference is None:
            self._reference = torch.cat(self._chunks)
            self._chunks = []
        rec = zscore_rows(features).to(self._reference.device)
        b = rec.shape[0]
        if self._seen + b > self._reference.shape[0]:
            raise ValueError("more reconstructions than ground-truth images")
        r = self._reference @ rec.T  # (N, b): r[i, j] = corr(gt_i, rec_(seen + j))
        columns = torch.arange(b, device=r.device)
        congruent = r[self._seen + columns, columns]
        self._counts.append((r < congruent).sum(0).cpu().numpy())
        self._seen += b

    def per_image(self) -> tuple[np.ndarray, int]:
        n = 0 if self._reference is None else self._reference.shape[0]
        if self._seen != n:
            raise ValueError(f"{self._seen} reconstructions for {n} ground-truth images")
        return np.concatenate(self._counts).astype(np.float64), n - 1


def two_way_identification(gt_features: torch.Tensor, rec_features: torch.Tensor, batch_size: int = 256,
                           ) -> tuple[float, np.ndarray]:
    """Two-way identification of paired (N, ...) feature sets -> (mean fraction correct, per-image fractions)."""
    metric = TwoWayIdentification()
    metric.add_reference(gt_features)
    for start in range(0, len(rec_features), batch_size):
        metric.add_candidates(rec_features[start:start + batch_size])
    counts, denominator = metric.per_image()
    per_image = counts / denominator
    return float(per_image.mean()), per_image
