"""One live fit per run directory: a lock file in the logger's version directory, held for the whole fit.

Two fits with the same logger name and version would interleave their checkpoints and event files without a
word; the second is refused instead, naming the lock, pid and host of the first. A lock whose pid is dead on this
host (a killed run being resumed), or that this Slurm job took before it was requeued, is taken over.

The lock is taken by the CLI before ``trainer.fit`` (``experiments.run``): Lightning opens the logger's event file
at the start of its setup, before any callback hook, so a hook would be too late. Only global rank zero takes it,
told by the launcher's environment (no process group exists yet); a refusal ends rank zero before the other ranks
meet it (Lightning's own launcher has not started them; torchrun and ``srun --kill-on-bad-exit`` end them).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L

from datamodules.common import OutputLockedError, acquire_lock, release_lock

RUN_LOCK = ".run.lock"


def is_global_rank_zero() -> bool:
    """Global rank zero from the launcher's environment (Lightning's launcher gives its children LOCAL_RANK > 0;
    torchrun sets RANK, Slurm SLURM_PROCID, multi-node launches NODE_RANK)."""
    env = os.environ
    if int(env.get("LOCAL_RANK", 0) or 0) != 0:
        return False
    for key in ("RANK", "SLURM_PROCID"):
        if env.get(key):
            return int(env[key]) == 0
    return int(env.get("NODE_RANK", env.get("GROUP_RANK", 0)) or 0) == 0


class RunDirectoryLock(L.Callback):
    """Holds ``<logger version directory>/.run.lock`` from ``acquire`` (before ``fit``) to the end of the fit."""

    def __init__(self) -> None:
        self._held: tuple[Path, dict[str, Any]] | None = None

    def acquire(self, trainer: L.Trainer) -> None:
        if not is_global_rank_zero():
            return
        logger = trainer.logger
        log_dir = getattr(logger, "log_dir", None) if logger is not None else trainer.default_root_dir
        if not log_dir:
            return
        path = Path(log_dir) / RUN_LOCK
        try:
            self._held = (path, acquire_lock(path, "fit"))
        except OutputLockedError as exc:
            raise OutputLockedError(f"{exc} (another fit uses this logger name and version: give another "
                                    "trainer.logger.init_args.version, or wait for it to end to resume it)") from None

    def release(self) -> None:
        if self._held is not None:
            release_lock(*self._held)
            self._held = None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.release()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.release()
