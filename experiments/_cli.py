"""Shared plumbing for the command-line doors: clear one-line errors and non-zero exits for bad input, and a log
without Lightning's notices that are not about the run."""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable

from datamodules.errors import DataFormatError


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run ``main``; a ``DataFormatError`` becomes ``error: <message>`` on stderr and exit status 2."""
    try:
        return main(argv)
    except DataFormatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


_LIGHTNING_TIP = "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]"


class _DropLightningTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_LIGHTNING_TIP)


def quiet_lightning() -> None:
    """Silence, by exact message, what Lightning prints on every fit that is not about this run (idempotent).

    Everything else stays visible: our own warnings, and Lightning's about the run (its logging-interval notice,
    a checkpoint it cannot find, ...). ``tests/test_warnings.py`` fits through the CLI and fails on any other.
    """
    # Lightning's own pytree helper uses torch's deprecated ``LeafSpec`` (torch >= 2.10): nothing to fix here
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning,
                            module=r"lightning\.pytorch\.utilities\._pytree")
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
    # An advertisement printed (logging, INFO) on every fit without a LitLogger
    import lightning.pytorch.utilities.rank_zero  # noqa: F401  (points rank_zero.log at Lightning's logger)
    from lightning_utilities.core import rank_zero

    if not any(isinstance(f, _DropLightningTip) for f in rank_zero.log.filters):
        rank_zero.log.addFilter(_DropLightningTip())
