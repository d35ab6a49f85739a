"""JSON records written into a run's log directory (``parameters.json``, ``test_metrics.json``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datamodules.atomic import write_json_atomic


def write_run_record(trainer, name: str, record: dict[str, Any]) -> Path | None:
    """Write ``record`` atomically as ``<log_dir>/<name>`` from rank zero; returns the path there (None elsewhere or
    without a log directory). Every rank must call it: ``trainer.log_dir`` is a broadcast under DDP."""
    log_dir = trainer.log_dir
    if not (trainer.is_global_zero and log_dir):
        return None
    path = Path(log_dir) / name
    write_json_atomic(path, record)
    return path
