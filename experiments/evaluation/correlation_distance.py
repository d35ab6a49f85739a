"""Mean correlation distance (EffNet-B1 and SwAV in MindEye2; lower is better).

Per pair, ``scipy.spatial.distance.correlation(gt_i, rec_i)`` = 1 - Pearson r of the flattened features (clipped
to [0, 2] as scipy does), averaged over images. Computed in float64.
"""

from __future__ import annotations

import numpy as np
import torch

from experiments.evaluation.low_level import pearson_rows


def correlation_distance(gt_features: torch.Tensor, rec_features: torch.Tensor) -> torch.Tensor:
    """(B, ...) paired features -> (B,) float64 correlation distances."""
    return (1.0 - pearson_rows(gt_features, rec_features)).clamp(0.0, 2.0)


class CorrelationDistance:
    """Stores GT features (``add_reference``, in order) and scores reconstruction batches against their GT."""

    def __init__(self) -> None:
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
        self._values.append(correlation_distance(gt, features.to(gt.device)).cpu())
        self._seen += b

    def per_image(self) -> tuple[np.ndarray, int]:
        return torch.cat(self._values).numpy(), 1
