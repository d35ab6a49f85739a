"""JSON records written into a run's log directory (``parameters.json``, ``test_metrics.json``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datamodules.common import write_json_atomic


def write_run_record(trainer, name: str, record: dict[str, Any]) -> Path | None:
    """Write ``record`` atomically as ``<log_dir>/<name>`` from rank zero; returns the path there (None elsewhere or
    without a log directory). Every rank must call it: ``trainer.log_dir`` is a broadcast under DDP."""
    log_dir = trainer.log_dir
    if not (trainer.is_global_zero and log_dir):
        return None
    path = Path(log_dir) / name
    write_json_atomic(path, record)
    return path


def count_parameters(params) -> tuple[int, int]:
    """(total, trainable) element counts of ``params`` (any iterable of parameters), for ``parameters.json``."""
    params = list(params)
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def attached_datamodule(module) -> Any:
    """The data module of the trainer ``module`` is attached to, or None (no trainer, or fitted without one)."""
    return getattr(module.trainer, "datamodule", None) if module._trainer is not None else None


def datamodule_record(datamodule: Any, *names: str) -> dict[str, Any]:
    """What a (set-up) data module says about the data, for provenance: ``names`` among ``data_dir``, ``subjects``,
    ``sessions``, ``normalisation`` (kind per subject) and ``val_images``, in that order; {} without one."""
    dm = datamodule
    if dm is None or not getattr(dm, "metas", None):
        return {}
    values = {"data_dir": lambda: str(dm.data_dir), "subjects": lambda: list(dm.subjects),
              "sessions": lambda: {s: dm.sessions(s) for s in dm.subjects},
              "normalisation": lambda: {s: dm.metas[s]["normalisation"].get("kind") for s in dm.subjects},
              "val_images": lambda: dm.val_images}
    return {name: values[name]() for name in names}
