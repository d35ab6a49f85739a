"""Interpretability analyses of trained MoRE-Brain checkpoints (``python -m experiments.interpret``).

One idea per file: ``loading`` (checkpoint + config -> model, test set, ROI metadata), ``attribution``
(batched integrated gradients of every expert), ``voxel_maps``, ``agreement`` (AMI against ROI labels with a
permutation null), ``semantic``, ``ica``, ``usage``, ``positive_control``, ``report`` (the HTML report),
``figures`` (PIL drawings) and ``outputs`` (atomic writers). The analysis modules import no Lightning.
"""

from experiments.interpretability.report import ReportItem, write_report

__all__ = ["ReportItem", "write_report"]
