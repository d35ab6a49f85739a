"""The LightningModules' metrics: retrieval (``retrieval_metrics``) and routing statistics (``routing_metrics``),
torchmetrics exact under DDP and the pure functions behind them."""

from lightning_modules.metrics.retrieval_metrics import RetrievalMetric, retrieval_top1
from lightning_modules.metrics.routing_metrics import (
    LevelRoutingMetric,
    SpatialEntropyMetric,
    jaccard,
    level_row_statistics,
    temporal_curve,
)

__all__ = ["LevelRoutingMetric", "RetrievalMetric", "SpatialEntropyMetric", "jaccard", "level_row_statistics",
           "retrieval_top1", "temporal_curve"]
