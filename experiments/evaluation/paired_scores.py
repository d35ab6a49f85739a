"""Paired feature scores: each reconstruction's features against its own image's, averaged over images.

- Mean correlation distance (EffNet-B1 and SwAV in MindEye2; lower is better): per pair,
  ``scipy.spatial.distance.correlation(gt_i, rec_i)`` = 1 - Pearson r of the flattened features (clipped to [0, 2]
  as scipy does). Computed in float64.
- CLIP cosine (the bottleneck analyses' "CLIP-Cos"; higher is better): cosine of the paired CLIP image embeddings.
"""

from __future__ import annotations

import numpy as np
import torch

from experiments.evaluation.low_level import pearson_rows


def correlation_distance(gt_features: torch.Tensor, rec_features: torch.Tensor) -> torch.Tensor:
    """(B, ...) paired features -> (B,) float64 correlation distances."""
    return (1.0 - pearson_rows(gt_features, rec_features)).clamp(0.0, 2.0)


def paired_cosine(gt_features: torch.Tensor, rec_features: torch.Tensor) -> torch.Tensor:
    """(B, ...) paired features -> (B,) float64 cosine similarities of the flattened features."""
    a, b = gt_features.flatten(1).double(), rec_features.flatten(1).double()
    return torch.nn.functional.cosine_similarity(a, b, dim=1)


PAIRED_SCORES = {"correlation_distance": correlation_distance, "cosine": paired_cosine}


class PairedScore:
    """Stores GT features (``add_reference``, in order) and scores reconstruction batches against their GT with
    ``PAIRED_SCORES[kind]``."""

    def __init__(self, kind: str = "correlation_distance") -> None:
        self._score = PAIRED_SCORES[kind]
        self._reference: list[torch.Tensor] = []
        self._reference_cat: torch.Tensor | None = None
        self._values: list[torch.Tensor] = []
        self._seen = 0

    def add_reference(self, features: torch.Tensor) -> None:
        self._reference.append(features.float())

    def add_candidates(self, features: torch.Tensor) -> None:
        if self._reference_cat is None:
            self._reference_cat = torch.cat(self._reference)
            self._reference = []
        b = features.shape[0]
        gt = self._reference_cat[self._seen:self._seen + b]
        self._values.append(self._score(gt, features.to(gt.device)).cpu())
        self._seen += b

    def per_image(self) -> tuple[np.ndarray, int]:
        return torch.cat(self._values).numpy(), 1
