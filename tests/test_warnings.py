"""A clean log: a tiny fit through the real CLI entry point shows no warning outside a short allow-list.

The filters are what a user's ``python -m experiments.run`` has: Python's defaults (deprecations outside
``__main__``, import and resource warnings hidden), Lightning's (its own deprecations shown), and the exact-message
filters of ``experiments._clean_log.quiet_lightning``. Everything shown is recorded: Python warnings, which include
Lightning's rank-zero warnings, and log records at WARNING or above; Lightning's litlogger tip (INFO) must not be
printed either.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TIP = "💡 Tip: For seamless cloud logging"

# What may still be shown, each with why it is not ours to fix (message prefixes; keep this list short)
ALLOWED: tuple[str, ...] = ()


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not any(r is record for r in self.records):  # attached to several loggers of one hierarchy
            self.records.append(record)


def _user_filters() -> None:
    """The warning filters of a plain ``python -m ...`` run (no -W, no dev mode), every occurrence shown."""
    from lightning.fabric.utilities.rank_zero import LightningDeprecationWarning

    warnings.resetwarnings()
    warnings.simplefilter("always")
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
        warnings.simplefilter("ignore", category)
    warnings.filterwarnings("always", category=DeprecationWarning, module="__main__")
    warnings.simplefilter("always", LightningDeprecationWarning)


def _stage1_args(data: Path, logs: Path) -> list[str]:
    return ["fit", "--config", str(REPO / "configs/base/trainer.yaml"),
            "--config", str(REPO / "configs/stage1/tiny_synthetic.yaml"),
            f"--data.init_args.data_dir={data}", "--data.init_args.targets={clip_text: targets/clip_text}",
            "--data.init_args.val_images=8", f"--data.init_args.val_cache_dir={logs / 'val_cache'}",
            "--data.init_args.samples_per_epoch=192", f"--trainer.default_root_dir={logs}",
            f"--trainer.logger.init_args.save_dir={logs}", "--trainer.logger.init_args.version=run",
            "--trainer.enable_progress_bar=false", "--trainer.max_epochs=2", "--trainer.check_val_every_n_epoch=1",
            # 4 batches per epoch here: at the config's 5 Lightning rightly warns that no training step is logged
            "--trainer.log_every_n_steps=2"]


def _shown(caught: list[warnings.WarningMessage], handler: _Records) -> list[str]:
    lines = [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught]
    lines += [f"log {r.levelname} {r.name}: {r.getMessage()}" for r in handler.records if r.levelno >= logging.WARNING]
    lines += [f"log {r.levelname} {r.name}: {r.getMessage()}" for r in handler.records
              if r.getMessage().startswith(TIP)]
    return [line for line in lines if not any(allowed in line for allowed in ALLOWED)]


def _fit_and_record(args: list[str]) -> list[str]:
    """Run ``experiments.run.cli_main(args)`` under a user's filters; what it showed outside the allow-list."""
    from experiments.run import cli_main

    handler = _Records()
    loggers = [logging.getLogger(name) for name in ("", "lightning.pytorch", "lightning.fabric", "lightning")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            _user_filters()
            cli_main(args)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    return _shown(caught, handler)


def test_tiny_fit_through_the_cli_shows_no_warning(small_data, targets, tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)  # a local run (Slurm installed here or not)
    shown = _fit_and_record(_stage1_args(small_data, tmp_path))
    assert (tmp_path / "stage1_tiny" / "run" / "checkpoints" / "last.ckpt").exists()
    assert not shown, "warnings outside the allow-list:\n" + "\n".join(shown)


def test_load_from_checkpoint_rebuilds_without_the_module_attribute_warning(small_data, targets, tmp_path):
    """The checkpoint's hyperparameters are the CLI config (moe, prior as class_path + init_args), so it rebuilds
    the module; the rebuilt module does not record its injected parts as hyperparameters (no Lightning warning)."""
    from experiments.run import cli_main
    from lightning_modules import BrainEncoderModule

    args = _stage1_args(small_data, tmp_path)
    args[args.index("--trainer.max_epochs=2")] = "--trainer.max_epochs=1"
    cli_main(args)
    ckpt = tmp_path / "stage1_tiny" / "run" / "checkpoints" / "last.ckpt"
    import torch

    hparams = torch.load(ckpt, map_location="cpu", weights_only=False)["hyper_parameters"]
    assert hparams["moe"]["class_path"] == "lightning_modules.components.HierarchicalMoE"
    with warnings.catch_warnings(record=True) as caught:
        _user_filters()
        model = BrainEncoderModule.load_from_checkpoint(ckpt, map_location="cpu")
    assert not [w for w in caught if "is an instance of `nn.Module`" in str(w.message)]
    assert "moe" not in model.hparams and model.moe.out_dim == hparams["moe"]["init_args"]["out_dim"]
    # `run test --ckpt_path` rebuilds it through the CLI from the same hyperparameters
    test_args = [a for a in args if not a.startswith(("--trainer.max_epochs", "--trainer.check_val"))]
    test_args[0] = "test"
    cli = cli_main([*test_args, f"--ckpt_path={ckpt}", "--verbose=false"])
    assert cli.model.hparams["moe"]["init_args"] == hparams["moe"]["init_args"]


def test_no_module_is_in_eval_mode_when_stage1_training_starts(small_data, targets, tmp_path):
    """What Lightning's silenced "modules in eval mode" notice would count (the Trainer keeps the modes the module
    was built with): stage 1 has no frozen part."""
    from experiments.run import cli_main

    cli = cli_main(_stage1_args(small_data, tmp_path)[1:], run=False)
    assert [name for name, module in cli.model.named_modules() if not module.training] == []


@pytest.mark.slow
def test_tiny_stage2_fit_shows_no_warning_and_only_its_frozen_parts_are_in_eval_mode(
        small_data, tiny_models, stage1_checkpoints, tmp_path, monkeypatch):
    """Stage 2 keeps the VAE and the frozen stage-1 encoders in eval mode (documented), nothing else (the UNet
    trains its LoRA); its tiny fit shows no warning outside the allow-list either."""
    from experiments.run import cli_main
    from tests.test_stage2_cli import overrides

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    args = overrides(small_data, tiny_models, stage1_checkpoints, tmp_path, "run")
    cli = cli_main(args, run=False)
    in_eval = {name.split(".")[0] for name, module in cli.model.named_modules() if not module.training}
    assert in_eval == {"vae", "image_encoder", "text_encoder"}
    shown = _fit_and_record(["fit", *args])
    assert not shown, "warnings outside the allow-list:\n" + "\n".join(shown)
