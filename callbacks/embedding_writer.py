"""Writes stage-1 ``predict`` outputs: one ``<subject>.npz`` per subject with per-nsd_id embeddings.

Arrays (rows sorted by ``nsd_id``): ``nsd_id`` (N,), ``clip_mean``/``backbone_mean``/``target``/``prior`` (N, D),
``backbone_level{l}``/``clip_level{l}`` (N, E_l, D), ``routing_indices_level{l}``/``routing_gates_level{l}``
(N, R', E_l, k_l) with R' = repeats (output averaging) or 1 (input averaging), ``routing_parent_level{l}`` (E_l,).
A ``<subject>.json`` beside it holds the shapes and provenance. Under DDP every rank writes its part, rank zero
merges them. Files are written atomically.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from datamodules.common import atomic_path, write_json_atomic


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)


def _to_numpy(records: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """One rank's predict records of a subject -> arrays (concatenated over batches)."""
    if not records:
        return {}
    return {key: (np.asarray(value) if key.startswith("routing_parent") else torch.cat([r[key] for r in records]).numpy())
            for key, value in records[0].items() if key != "subject"}


def _concat_sorted(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate per-rank arrays and sort the rows by ``nsd_id``."""
    parts = [p for p in parts if p]
    if not parts:
        return {}
    arrays = {k: parts[0][k] if k.startswith("routing_parent") else np.concatenate([p[k] for p in parts])
              for k in parts[0]}
    order = np.argsort(arrays["nsd_id"], kind="stable")
    return {k: (v if k.startswith("routing_parent") else v[order]) for k, v in arrays.items()}


class EmbeddingWriter(L.Callback):
    """Collect ``predict_step`` records per subject and write them to ``output_dir`` (default
    ``<log_dir>/predictions``)."""

    def __init__(self, output_dir: str | None = None):
        super().__init__()
        self.output_dir = output_dir
        self.records: dict[str, list[dict[str, Any]]] = defaultdict(list)

    def _dir(self, trainer: L.Trainer) -> Path:
        return Path(self.output_dir or Path(trainer.log_dir or trainer.default_root_dir) / "predictions")

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        self.records = defaultdict(list)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if outputs is not None and len(outputs["nsd_id"]):
            self.records[outputs["subject"]].append(outputs)

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        out = self._dir(trainer)
        subjects = list(getattr(trainer.datamodule, "subjects", None) or self.records)
        local = {s: _to_numpy(self.records[s]) for s in subjects}
        distributed = trainer.world_size > 1
        if distributed:
            for subject, arrays in local.items():
                _save_npz(out / f".{subject}.rank{trainer.global_rank}.npz", arrays)
            trainer.strategy.barrier("embedding_writer")
        if not trainer.is_global_zero:
            return
        for subject in subjects:
            if distributed:
                paths = [out / f".{subject}.rank{r}.npz" for r in range(trainer.world_size)]
                arrays = _concat_sorted([dict(np.load(p)) for p in paths])
                for path in paths:
                    path.unlink(missing_ok=True)
            else:
                arrays = _concat_sorted([local[subject]])
            _save_npz(out / f"{subject}.npz", arrays)
            meta = {"subject": subject, "shapes": {k: list(v.shape) for k, v in arrays.items()},
                    "provenance": pl_module.provenance() if hasattr(pl_module, "provenance") else {}}
            write_json_atomic(out / f"{subject}.json", meta)
