"""One "node" of an emulated two-node Slurm fit: the real array task (``experiments.slurm.task``), with counters.

    MULTINODE_EVENTS=FILE [MULTINODE_WRITE_DELAY_S=S] python -m tests.helpers.multinode_probe SWEEP

runs ``experiments.slurm.task SWEEP`` in this process after wrapping three real code paths so that each call
appends one JSON line to ``FILE`` (with this process's ``SLURM_PROCID`` and ``SLURM_NODEID``):
``prepare_data`` (``NSDDataModule.prepare_data``), ``write_shard`` (the validation shard written by
``datamodules.val_split``, after ``S`` seconds of sleep so that two nodes writing at once overlap) and
``save_checkpoint`` (``AtomicCheckpointIO.save_checkpoint``, with the file name).

``NodeProbe`` (``--trainer.callbacks+=tests.helpers.multinode_probe.NodeProbe --trainer.callbacks.out=DIR``)
writes ``DIR/rank<global rank>.json``: the cluster environment, ranks, world size, the (session, trial, nsd_id) of every
training sample per epoch and subject, and the ``val/`` metrics this rank holds after each validation.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L


def record(event: str, **fields: Any) -> None:
    line = json.dumps({"event": event, "rank": int(os.environ["SLURM_PROCID"]),
                       "node": int(os.environ["SLURM_NODEID"]), **fields})
    with open(os.environ["MULTINODE_EVENTS"], "a") as handle:  # one short O_APPEND write per line
        handle.write(line + "\n")


def _counted(owner: Any, name: str, event: str, describe=lambda *a: {}, delay_s: float = 0.0) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        record(event, **describe(*args))
        time.sleep(delay_s)
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


def install() -> None:
    import datamodules.val_split as val_split
    from callbacks.atomic_checkpoint_io import AtomicCheckpointIO
    from datamodules.nsd import NSDDataModule

    _counted(NSDDataModule, "prepare_data", "prepare_data")
    _counted(val_split, "write_shard", "write_shard", lambda path, *_: {"path": str(path)},
             float(os.environ.get("MULTINODE_WRITE_DELAY_S", "0")))
    _counted(AtomicCheckpointIO, "save_checkpoint", "save_checkpoint",
             lambda self, checkpoint, path, *_: {"path": str(path)})


class NodeProbe(L.Callback):
    def __init__(self, out: str):
        self.out = Path(out)
        self.trials: dict[str, dict[str, list]] = {}
        self.validations: list[dict[str, Any]] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        epoch = self.trials.setdefault(str(trainer.current_epoch), {})
        for subject, b in batch.items():
            epoch.setdefault(subject, []).extend(zip(b["session"].tolist(), b["trial"].tolist(),
                                                              b["nsd_id"].tolist()))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.validations.append({k: float(v) for k, v in trainer.callback_metrics.items()
                                     if k.startswith("val/")})

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        info = {"environment": type(trainer.strategy.cluster_environment).__name__,
                "global_rank": trainer.global_rank, "local_rank": trainer.local_rank,
                "node_rank": trainer.node_rank, "world_size": trainer.world_size, "trials": self.trials,
                "validations": self.validations}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(info))


def main(argv: list[str] | None = None) -> int:
    install()
    from experiments.slurm.task import main as task_main

    return task_main(argv)


if __name__ == "__main__":
    sys.exit(main())
