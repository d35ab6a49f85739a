"""Stage-1 weights on disk, read as data: a Lightning checkpoint or an export directory; and writing the export.

An export directory holds ``model.safetensors`` (the module's state dict: adapters, MoE, prior, token head; no
optimizer, scheduler or loop state) and ``config.json``: ``format`` / ``format_version``, the hyperparameters as
``save_hyperparameters`` saved them (what rebuilds the module), ``num_voxels``, ``target``, ``prior_inputs``, the
weights' sha256, and the checkpoint's provenance (resolved config, data format version, ...) with the source
checkpoint's path and sha256 and the export's own record under ``exported``. A checkpoint is read memory-mapped
(``torch.load(weights_only=True, mmap=True)``) and only its ``state_dict`` and ``hyper_parameters`` are kept: the
optimizer state is never read into memory.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from datamodules.common import HOST, DataFormatError, file_sha256, provenance
from lightning_modules.checkpoint_files import refusal

WEIGHTS, CONFIG = "model.safetensors", "config.json"
EXPORT_FORMAT, EXPORT_FORMAT_VERSION = "morebrain-stage1-export", 1


class Stage1FileError(DataFormatError):
    """A stage-1 checkpoint or export that cannot be read or rebuilt; the message names the option."""


@dataclass
class Stage1Weights:
    """What rebuilds a stage-1 module: ``state_dict`` (name -> tensor), ``hyper_parameters``, the source's
    ``provenance`` (None when it has none) and ``path``; ``extra``: epoch / global_step of a checkpoint."""

    state_dict: dict[str, torch.Tensor]
    hyper_parameters: dict[str, Any]
    provenance: dict[str, Any] | None
    path: Path
    extra: dict[str, Any]


def _brief(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:240]}"


def weights_sha256(path: str | Path) -> str:
    """The sha256 that identifies a stage-1 file's weights: of its ``model.safetensors`` for an export, of the
    checkpoint file otherwise (what a conditioning cache records of the encoder it was computed from)."""
    export = export_dir(path)
    return file_sha256(export / WEIGHTS if export is not None else path)


def export_dir(path: str | Path) -> Path | None:
    """The export directory ``path`` names (the directory or its ``model.safetensors``), None for anything else."""
    path = Path(path)
    if path.is_dir():
        return path
    return path.parent if path.name == WEIGHTS or path.suffix == ".safetensors" else None


def _read_checkpoint(path: Path, option: str) -> Stage1Weights:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise refusal(option, path, exc) from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise Stage1FileError(f"{option}: {path} is not a readable stage-1 checkpoint ({_brief(exc)})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise Stage1FileError(f"{option}: {path} has no state_dict: not a Lightning checkpoint")
    extra = {k: ckpt[k] for k in ("epoch", "global_step") if k in ckpt}
    weights = Stage1Weights(ckpt["state_dict"], dict(ckpt.get("hyper_parameters") or {}), ckpt.get("provenance"),
                            path, extra)
    del ckpt  # the optimizer, scheduler and loop state go with it: mapped, never read
    return weights


def _read_export(directory: Path, option: str) -> Stage1Weights:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config_path, weights_path = directory / CONFIG, directory / WEIGHTS
    for needed in (config_path, weights_path):
        if not needed.is_file():
            raise Stage1FileError(f"{option}: {directory} is not a stage-1 export: no {needed.name} (write one with "
                                  "python -m experiments.export_stage1)")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise Stage1FileError(f"{option}: {config_path} is not valid JSON ({_brief(exc)})") from None
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT:
        raise Stage1FileError(f"{option}: {config_path} is not a {EXPORT_FORMAT} config")
    if config.get("format_version") != EXPORT_FORMAT_VERSION or not isinstance(config.get("hyper_parameters"), dict):
        raise Stage1FileError(f"{option}: {config_path} is export format version {config.get('format_version')!r}; "
                              f"this code reads version {EXPORT_FORMAT_VERSION} (export the checkpoint again)")
    if config.get("weights_sha256") != file_sha256(weights_path):
        raise Stage1FileError(f"{option}: {weights_path} does not match the sha256 in {config_path} (damaged or "
                              "replaced: export the checkpoint again)")
    try:
        state = load_file(weights_path, device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise Stage1FileError(f"{option}: {weights_path} is not a readable safetensors file ({_brief(exc)})") from None
    return Stage1Weights(state, config["hyper_parameters"], config.get("provenance"), directory, {})


def read_stage1(path: str | Path, option: str) -> Stage1Weights:
    """The weights and hyperparameters of a stage-1 checkpoint (``.ckpt``) or export (directory or its
    ``model.safetensors``); anything unreadable raises ``Stage1FileError`` (a pickle needing code
    ``UnsafeCheckpointError``) naming ``option``."""
    directory = export_dir(path)
    return _read_export(directory, option) if directory is not None else _read_checkpoint(Path(path), option)


def build_stage1(cls, weights: Stage1Weights, option: str):
    """``cls`` (``BrainEncoderModule``) rebuilt from ``weights.hyper_parameters`` (through Lightning's own
    checkpoint path: the CLI instantiator allowlist and class check apply) with ``weights.state_dict`` loaded
    strictly. Lightning's CLI hyperparameter context is cleared meanwhile: LightningCLI hands the hyperparameters of
    the module it is instantiating to every ``save_hyperparameters`` call made then, which would give a nested
    stage-1 module stage 2's hyperparameters."""
    from lightning.pytorch.core.mixins import hparams_mixin
    from lightning.pytorch.core.saving import _load_state

    token = hparams_mixin._given_hyperparameters.set(None)
    try:
        return _load_state(cls, {cls.CHECKPOINT_HYPER_PARAMS_KEY: dict(weights.hyper_parameters),
                                 "state_dict": weights.state_dict}, strict=True)
    except (RuntimeError, ValueError, TypeError, KeyError) as exc:
        raise Stage1FileError(f"{option}: {weights.path} does not rebuild a stage-1 {cls.__name__} "
                              f"({_brief(exc)})") from None
    finally:
        hparams_mixin._given_hyperparameters.reset(token)


def _is_export(directory: Path) -> bool:
    try:
        return json.loads((directory / CONFIG).read_text()).get("format") == EXPORT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _check_out(out: Path, option: str) -> None:
    """``out`` is new, an empty directory or a previous export (which the export replaces)."""
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or _is_export(out))):
        raise Stage1FileError(f"{option}: {out} exists and is not a stage-1 export: give a new directory")


def export_stage1(checkpoint: str | Path, out: str | Path, option: str = "--checkpoint",
                  out_option: str = "--out") -> Path:
    """Write the export directory ``out`` of a stage-1 checkpoint, atomically (a temporary sibling renamed into
    place; a previous export there is replaced). Returns ``out``."""
    from safetensors.torch import save_file

    from lightning_modules.brain_encoder import BrainEncoderModule

    checkpoint, out = Path(checkpoint), Path(out).absolute()
    if not checkpoint.is_file() or export_dir(checkpoint) is not None:
        raise Stage1FileError(f"{option}: no stage-1 checkpoint (.ckpt file) at {checkpoint}")
    _check_out(out, out_option)
    weights = read_stage1(checkpoint, option)
    record = weights.provenance
    if not isinstance(record, dict) or "data_format_version" not in record:
        raise Stage1FileError(f"{option}: {checkpoint} has no provenance with a data_format_version: not written by "
                              "this project's stage 1 (experiments.run fit)")
    module = build_stage1(BrainEncoderModule, weights, option)
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    config = {"format": EXPORT_FORMAT, "format_version": EXPORT_FORMAT_VERSION,
              "hyper_parameters": weights.hyper_parameters, "num_voxels": dict(module.num_voxels),
              "target": module.hparams.target, "prior_inputs": list(module.prior_inputs),
              "has_prior": module.prior is not None, "weights_sha256": None,
              "provenance": {**record, "source_checkpoint": str(checkpoint.resolve()),
                             "source_checkpoint_sha256": file_sha256(checkpoint), **{
                                 f"source_{k}": v for k, v in weights.extra.items()},
                             "exported": provenance()}}
    try:
        json.dumps(config)
    except (TypeError, ValueError) as exc:
        raise Stage1FileError(f"{option}: {checkpoint}'s hyperparameters are not plain data ({_brief(exc)})") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = (out.with_name(f".{out.name}.{HOST}.{os.getpid()}.{kind}") for kind in ("tmp", "old"))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(state, tmp / WEIGHTS, metadata={"format": "pt"})
        config["weights_sha256"] = file_sha256(tmp / WEIGHTS)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        shutil.copymode(tmp / CONFIG, tmp / WEIGHTS)  # safetensors writes 0600; give it the umask's mode
        _check_out(out, out_option)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        if old.exists() and not out.exists():
            os.replace(old, out)  # the previous export stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out
