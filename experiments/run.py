"""The command-line entry point of both stages (LightningCLI, OmegaConf parser mode).

    python -m experiments.run fit --config configs/base/trainer.yaml --config configs/stage1/tiny_synthetic.yaml
    python -m experiments.run test --config ... --ckpt_path runs/.../checkpoints/last.ckpt
    python -m experiments.run fit --config ... --print_config

``model.init_args.num_voxels`` is linked from the data module (voxel count per subject); the resolved config is
saved beside the logs (overwritten on re-runs) and stored in every checkpoint's provenance.
"""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import lightning as L  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402

from callbacks.atomic_checkpoint_io import refuse_if_damaged  # noqa: E402
from callbacks.run_lock import RunDirectoryLock  # noqa: E402
from lightning_modules.checkpoint_files import refusal  # noqa: E402

STAGES = {"BrainEncoderModule": "stage 1", "RoutedDiffusionModule": "stage 2"}


def _stage_of(class_path: str, may_import: bool) -> str | None:
    """"stage 1"/"stage 2" of a module class (by its class or a base class name), None when unknown. A class path
    read from a checkpoint is never imported (``may_import=False``: only an already loaded module is looked in), so
    a crafted file cannot make this import anything."""
    import importlib

    module_name, _, name = class_path.rpartition(".")
    if name in STAGES:
        return STAGES[name]
    module = sys.modules.get(module_name)
    if module is None and may_import:
        try:
            module = importlib.import_module(module_name)
        except (ImportError, ValueError):
            return None
    cls = getattr(module, name, None) if module is not None else None
    return next((STAGES[c.__name__] for c in getattr(cls, "__mro__", ()) if c.__name__ in STAGES), None)


def check_checkpoint_module(ckpt_path: str | None, class_path: str | None) -> None:
    """Refuse a ``--ckpt_path`` checkpoint of another LightningModule than ``model.class_path`` (a stage-2
    checkpoint given to a stage-1 fit, or the reverse) before anything runs: LightningCLI would otherwise take the
    checkpoint's class with this config's settings and fail later inside a callback. Reads the checkpoint with
    ``weights_only=True`` (memory-mapped: nothing is executed, little is read); a file that cannot be read so is
    left to the damaged-checkpoint check."""
    import torch

    from datamodules.common import DataFormatError

    if not ckpt_path or not class_path or not Path(ckpt_path).is_file():
        return  # "last"/"best" or a missing file: Lightning resolves or reports those
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - unreadable here: refuse_if_damaged names it on the CLI's own load
        return
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    saved = hparams.get("_class_path") if isinstance(hparams, dict) else None
    if not isinstance(saved, str):
        return
    saved_stage, wanted_stage = _stage_of(saved, may_import=False), _stage_of(class_path, may_import=True)
    if saved_stage and wanted_stage and saved_stage != wanted_stage:
        raise DataFormatError(f"--ckpt_path {ckpt_path} is a {saved_stage} checkpoint (of {saved}), but "
                              f"model.class_path is {class_path} ({wanted_stage}): give a {wanted_stage} checkpoint, "
                              f"or the {saved_stage} configs")


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
        its CheckpointIO exist: a damaged file would fail there with a zip/pickle traceback; name it instead.

        Lightning then replaces the whole model config with the checkpoint's hyperparameters, so a model option given
        here (``predict --model.init_args.inference_steps=30``, stage 2's condition tables) would be dropped
        silently. When the config names the model (every config of this project does), the config wins: the
        checkpoint gives the weights, the config the module."""
        model = None
        if self.config.get("subcommand"):
            sub = self.config[self.config.subcommand]
            model = sub.get("model")
            check_checkpoint_module(sub.get("ckpt_path"), getattr(model, "class_path", None) if model else None)
        try:
            super()._parse_ckpt_path()  # torch.load(..., weights_only=True): a pickle payload never runs
            if model is not None and getattr(model, "class_path", None):
                self.config[self.config.subcommand]["model"] = model
        except (SystemExit, KeyboardInterrupt, ImportError, MemoryError):
            raise
        except pickle.UnpicklingError as exc:
            path = self.config[self.config.subcommand].get("ckpt_path")
            refuse_if_damaged(path)
            raise refusal("--ckpt_path", path, exc) from None
        except Exception:
            refuse_if_damaged(self.config[self.config.subcommand].get("ckpt_path"))
            raise

    def _run_lock(self) -> RunDirectoryLock | None:
        return next((c for c in self.trainer.callbacks if isinstance(c, RunDirectoryLock)), None)

    def before_fit(self) -> None:
        """Take the version directory's lock before ``trainer.fit`` opens any file in it (``RunDirectoryLock``)."""
        lock = self._run_lock()
        if lock is not None:
            lock.acquire(self.trainer)

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        finally:  # released however the fit ends (the callback also releases at teardown and on an exception)
            lock = self._run_lock() if getattr(self, "trainer", None) is not None else None
            if lock is not None:
                lock.release()

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data", "model.init_args.num_voxels", compute_fn=num_voxels_of, apply_on="instantiate")

    def instantiate_classes(self) -> None:
        if not self._instantiate:
            return
        super().instantiate_classes()
        if self.subcommand == "fit" and not any(isinstance(c, RunDirectoryLock) for c in self.trainer.callbacks):
            self.trainer.callbacks.insert(0, RunDirectoryLock())  # one live fit per logger version directory
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if hasattr(self.model, "run_config"):
            self.model.run_config = self._parser(self.subcommand).dump(config, skip_link_targets=False)


def cli_main(args: list[str] | None = None, run: bool = True, instantiate: bool = True) -> MoreBrainCLI:
    """Build (and by default run) the CLI; tests and other commands call it with ``args`` (the calling process's
    own command line is then not the CLI's)."""
    from experiments._clean_log import quiet_lightning

    quiet_lightning()
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
    args = list(sys.argv[1:] if argv is None else argv)
    with mock.patch.object(sys, "argv", [sys.argv[0], *args]):  # Lightning's DDP launcher re-runs sys.argv
        cli_main()
    return 0


if __name__ == "__main__":
    from datamodules.common import run_command

    sys.exit(run_command(main))
