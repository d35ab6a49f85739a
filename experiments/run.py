"""The command-line entry point of both stages (LightningCLI, OmegaConf parser mode).

    python -m experiments.run fit --config configs/base/trainer.yaml --config configs/stage1/tiny_synthetic.yaml
    python -m experiments.run test --config ... --ckpt_path runs/.../checkpoints/last.ckpt
    python -m experiments.run fit --config ... --print_config

``model.init_args.num_voxels`` is linked from the data module (voxel count per subject); the resolved config is
saved beside the logs (overwritten on re-runs) and stored in every checkpoint's provenance.
"""

from __future__ import annotations

import os
import sys
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import lightning as L  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402

from callbacks.atomic_checkpoint_io import refuse_if_damaged  # noqa: E402


def num_voxels_of(datamodule) -> dict[str, int]:
    """Voxel count per subject of an ``NSDDataModule`` (the link source of ``model.init_args.num_voxels``)."""
    return datamodule.num_voxels()


class MoreBrainCLI(LightningCLI):
    """LightningCLI with the project's links; ``instantiate=False`` parses and validates only."""

    def __init__(self, *args, instantiate: bool = True, **kwargs):
        self._instantiate = instantiate
        super().__init__(*args, **kwargs)

    def _parse_ckpt_path(self) -> None:
        """LightningCLI ``torch.load``s a ``--ckpt_path`` file itself (for its hyperparameters) before the Trainer and
        its CheckpointIO exist: a damaged file would fail there with a zip/pickle traceback; name it instead."""
        try:
            super()._parse_ckpt_path()
        except (SystemExit, KeyboardInterrupt, ImportError, MemoryError):
            raise
        except Exception:
            refuse_if_damaged(self.config[self.config.subcommand].get("ckpt_path"))
            raise

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data", "model.init_args.num_voxels", compute_fn=num_voxels_of, apply_on="instantiate")

    def instantiate_classes(self) -> None:
        if not self._instantiate:
            return
        super().instantiate_classes()
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if hasattr(self.model, "run_config"):
            self.model.run_config = self._parser(self.subcommand).dump(config, skip_link_targets=False)


def cli_main(args: list[str] | None = None, run: bool = True, instantiate: bool = True) -> MoreBrainCLI:
    """Build (and by default run) the CLI; tests and other commands call it with ``args`` (the calling process's
    own command line is then not the CLI's)."""
    argv = sys.argv[:1] if args is not None else sys.argv
    with mock.patch.object(sys, "argv", argv):
        return MoreBrainCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True,
                            subclass_mode_data=True, parser_kwargs={"parser_mode": "omegaconf"},
                            save_config_kwargs={"overwrite": True}, args=args, run=run, instantiate=instantiate,
                            auto_configure_optimizers=False)


def main(argv: list[str] | None = None) -> int:
    """The command line: a user error (unknown subject, too many sessions, ``val_images`` too large, a checkpoint
    of the other stage, ...) is one line on stderr and exit status 2; ``--debug`` or ``MOREBRAIN_DEBUG=1`` keeps
    the traceback."""
    cli_main(list(sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    from datamodules.errors import run_command

    sys.exit(run_command(main))
