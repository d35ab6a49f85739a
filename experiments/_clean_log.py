"""A clean log for every command: Lightning's notices that are not about the run, silenced by exact message.

``experiments.run.cli_main`` calls ``quiet_lightning`` before it builds the CLI; ``tests/test_warnings.py`` fits
both stages through it and fails on any other warning.
"""

from __future__ import annotations

import logging
import os
import warnings

_LIGHTNING_TIP = "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]"


class _DropLightningTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_LIGHTNING_TIP)


def quiet_lightning() -> None:
    """Silence, by exact message, what Lightning prints on every fit that is not about this run (idempotent).

    Everything else stays visible: our own warnings, and Lightning's about the run (its logging-interval notice,
    a checkpoint it cannot find, ...).
    """
    # Lightning's own pytree helper uses torch's deprecated ``LeafSpec``: nothing of ours to fix
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning, module=r"lightning\.pytorch\.utilities\._pytree")
    # Our training streams define ``__len__`` on purpose (the fixed epoch length every rank and worker shares) and
    # configure every worker independently (seeded by subject, rank, worker and epoch: datamodules/README.md, DDP),
    # which is the caution's condition
    warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined\. In combination with "
                            r"multi-process data loading")
    # Stage 2 keeps its frozen parts in eval mode on purpose: the SDXL VAE (``RoutedDiffusionModule.train``) and the
    # stage-1 encoders with their priors (``FrozenStage1.train``); stage 1 has none. Which modules are in eval mode
    # at the start of training is asserted per stage in tests/test_warnings.py
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training\. This "
                            r"may lead to unexpected behavior during training\. If this is intentional, you can "
                            r"ignore this warning\.")
    # On any machine with Slurm installed Lightning hints at srun for every run outside srun; outside an allocation
    # (no SLURM_JOB_ID: a local run, a login node) that is not this run's concern. Inside one it stays visible: there
    # a run without srun is the mistake the hint is for (our sbatch script always uses srun)
    if "SLURM_JOB_ID" not in os.environ:
        warnings.filterwarnings("ignore", message=r"The `srun` command is available on your system but is not used\.")
    # ``predict`` / ``validate`` from a fit's checkpoint into another version directory (the demo's reconstruction
    # rows, a resumable predict): the checkpoint callbacks' bookkeeping of the fit is not reloaded, which is right,
    # since these runs write no checkpoint
    warnings.filterwarnings("ignore", message=r"The dirpath has changed from .* therefore `best_model_score`, "
                            r"`kth_best_model_path`, `kth_value`, `last_model_path` and `best_k_models` won't be "
                            r"reloaded\. Only `best_model_path` will be reloaded\.")
    # An advertisement printed (logging, INFO) on every fit without a LitLogger
    import lightning.pytorch.utilities.rank_zero  # noqa: F401  (points rank_zero.log at Lightning's logger)
    from lightning_utilities.core import rank_zero

    if not any(isinstance(f, _DropLightningTip) for f in rank_zero.log.filters):
        rank_zero.log.addFilter(_DropLightningTip())
