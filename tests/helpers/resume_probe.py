"""A test-only callback that records what a (resumed) fit restored and trained on, for the kill-and-resume tests.

Passed through the real entry point: ``--trainer.callbacks+=tests.helpers.resume_probe.ResumeProbe
--trainer.callbacks.out=DIR [--trainer.callbacks.pause_at_step=N]``. It writes under ``out``:

- ``restored.pt`` at ``on_train_start`` (after Lightning restored a checkpoint, before the first step): the
  checkpoint path, ``global_step``, ``current_epoch``, the batches already run in the epoch, and the state dicts
  of the first optimizer and LR scheduler as the trainer holds them;
- ``batches.json`` at ``on_train_end``: per training batch the epoch, batch index, global step, and per subject the
  stream's epoch and the nsd_ids;
- ``final.json`` at ``on_train_end``: ``global_step``, every callback metric, and the ``val/`` metrics after each
  validation of this process (``validations``).

``pause_at_step``: at the end of the training batch that makes ``global_step`` this value, write ``paused`` and
sleep ``pause_s`` seconds (the test kills the process meanwhile; ModelCheckpoint runs after this callback, so the
checkpoints of earlier steps are complete and the one of this step is not started).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch


class ResumeProbe(L.Callback):
    def __init__(self, out: str, pause_at_step: int | None = None, pause_s: float = 120.0):
        self.out = Path(out)
        self.pause_at_step, self.pause_s = pause_at_step, pause_s
        self.batches: list[dict[str, Any]] = []
        self.validations: list[dict[str, Any]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        record = {"ckpt_path": None if trainer.ckpt_path is None else str(trainer.ckpt_path),
                  "global_step": trainer.global_step, "current_epoch": trainer.current_epoch,
                  "batches_done": trainer.fit_loop.epoch_loop.batch_progress.current.ready,
                  "optimizer": trainer.optimizers[0].state_dict(),
                  "lr_scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict()}
        torch.save(record, self.out / "restored.pt")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.batches.append({"epoch": trainer.current_epoch, "batch_idx": batch_idx, "step": trainer.global_step,
                             "stream_epoch": {s: int(b["epoch"]) for s, b in batch.items()},
                             "nsd_id": {s: b["nsd_id"].tolist() for s, b in batch.items()}})

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.pause_at_step is not None and trainer.global_step == self.pause_at_step:
            (self.out / "paused").write_text(str(trainer.global_step))
            time.sleep(self.pause_s)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            self.validations.append({"epoch": trainer.current_epoch, "step": trainer.global_step, "metrics": metrics})

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "batches.json").write_text(json.dumps(self.batches))
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        (self.out / "final.json").write_text(json.dumps({"global_step": trainer.global_step, "metrics": metrics,
                                                         "validations": self.validations}))
