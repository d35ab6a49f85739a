"""Load what the stage-2 analyses need: a trained ``RoutedDiffusionModule`` (``--ckpt``) built from its run config
(``--config``: SDXL directory and stage-1 checkpoints) with its data module, as ``experiments.run predict`` does.

Bad input is an ``InterpretabilityInputError`` naming the option at fault.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from experiments.interpretability.loading import InterpretabilityInputError, check_configs, check_paths
from lightning_modules.checkpoint_files import UnsafeCheckpointError, load_checkpoint_data


@dataclass
class Stage2Run:
    """A trained stage-2 model (eval mode, frozen; None when only the data was asked for) and its data module."""

    model: Any  # RoutedDiffusionModule | None
    datamodule: Any  # NSDDataModule
    checkpoint: Path | None


def load_stage2_data(configs: list[str], overrides: list[str] | None = None):
    """The data module of a stage-2 run config (no model is built)."""
    from experiments._config import build, load_config

    check_configs(configs)
    config = load_config(list(configs), overrides)
    _check_stage2(str(config.get("model", {}).get("class_path", "")))
    return build(config["data"])


def _check_stage2(class_path: str) -> None:
    if not class_path.endswith("RoutedDiffusionModule"):
        raise InterpretabilityInputError(f"--config: the model is {class_path or 'missing'}, not a stage-2 "
                                         "RoutedDiffusionModule (these analyses read stage-2 runs)")


def load_stage2_run(checkpoint: str | Path | None, configs: list[str], overrides: list[str] | None = None,
                    device: str = "cpu") -> Stage2Run:
    """``--ckpt`` + ``--config`` (+ CLI-style overrides) -> ``Stage2Run``. The module is built from the config
    through the CLI (frozen parts from ``model.sdxl_dir`` and the stage-1 checkpoints) and the checkpoint's trained
    parameters are loaded after the module's own check that they match the configuration."""
    from experiments.run import cli_main
    from lightning_modules.routed_diffusion import RoutedDiffusionModule

    if checkpoint is None:
        return Stage2Run(None, load_stage2_data(configs, overrides), None)
    checkpoint = check_paths(checkpoint, configs)
    try:
        state = load_checkpoint_data(checkpoint, "--ckpt")
        state_dict = state["state_dict"]
    except UnsafeCheckpointError as exc:
        raise InterpretabilityInputError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - any read failure is the same user error
        raise InterpretabilityInputError(f"--ckpt: {checkpoint} is not a readable Lightning checkpoint "
                                         f"({type(exc).__name__}: {exc})") from exc
    cli = cli_main([*(a for c in configs for a in ("--config", str(c))), *(overrides or [])], run=False)
    model = cli.model
    if not isinstance(model, RoutedDiffusionModule):
        _check_stage2(type(model).__name__)
    model.configure_model()  # the frozen weights, as the Trainer would load them before restoring a checkpoint
    try:
        model.on_load_checkpoint(state)
    except ValueError as exc:
        raise InterpretabilityInputError(f"--ckpt {checkpoint} does not belong to --config: {exc}") from exc
    model.load_state_dict(state_dict, strict=False)
    model.eval().requires_grad_(False)
    return Stage2Run(model.to(device), cli.datamodule, checkpoint)
