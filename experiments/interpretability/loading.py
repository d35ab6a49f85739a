"""Load what the stage-1 analyses need: a trained ``BrainEncoderModule`` (``--ckpt``), the data module of its run
config (``--config``), and one subject's whole test set in memory, with the subject's ROI metadata.

Bad input is an ``InterpretabilityInputError`` (a ``DataFormatError``: the command doors print it as one line and
exit with status 2) naming the option at fault.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datamodules.common import DataFormatError
from datamodules.shard_format import subject_name


class InterpretabilityInputError(DataFormatError):
    """A missing checkpoint, an unknown subject or a config that does not match the checkpoint."""


@dataclass
class TestSet:
    """One subject's test images: ``voxels`` (N, R, V) float32, ``repeat_mask`` (N, R) bool, ``nsd_id`` (N,),
    ``categories`` (N lists of COCO super-categories), ``target`` (N, D) or None."""

    subject: str
    voxels: torch.Tensor
    repeat_mask: torch.Tensor
    nsd_id: np.ndarray
    categories: list[list[str]]
    target: torch.Tensor | None

    def __len__(self) -> int:
        return len(self.nsd_id)

    def subset(self, count: int) -> TestSet:
        """The first ``count`` images (all when ``count`` <= 0)."""
        if count <= 0 or count >= len(self):
            return self
        return TestSet(self.subject, self.voxels[:count], self.repeat_mask[:count], self.nsd_id[:count],
                       self.categories[:count], None if self.target is None else self.target[:count])


@dataclass
class RoiInfo:
    """A subject's voxel metadata: ``mask`` (X, Y, Z) volume whose positive voxels in C order are the data's
    voxels, its ``affine``; ``labels`` (V,) ROI index per voxel and their ``names`` (synthetic data)."""

    mask: np.ndarray | None = None
    affine: np.ndarray | None = None
    labels: np.ndarray | None = None
    names: list[str] = field(default_factory=list)
    background: np.ndarray | None = None  # the subject's mean volume on the mask's grid (raw NSD imports)

    @property
    def voxel_positions(self) -> np.ndarray | None:
        """(V,) C-order flat positions of the voxels in the mask volume."""
        return None if self.mask is None else np.flatnonzero(self.mask.reshape(-1) > 0)


@dataclass
class Stage1Run:
    """A trained stage-1 model (eval mode, parameters frozen) with its data module and resolved config."""

    model: Any  # BrainEncoderModule
    datamodule: Any  # NSDDataModule
    config: dict[str, Any]
    checkpoint: Path
    configs: list[str]

    @property
    def target_name(self) -> str:
        return str(self.model.hparams.target)

    def default_subject(self) -> str:
        return next(s for s in self.datamodule.subjects if s in self.model.num_voxels)


def check_paths(checkpoint: str | Path | None, configs: list[str] | None) -> Path:
    """The checkpoint and every config file exist (else an error naming ``--ckpt`` / ``--config``)."""
    if not checkpoint or not Path(checkpoint).is_file():
        raise InterpretabilityInputError(f"--ckpt: no checkpoint at {checkpoint}")
    if not configs:
        raise InterpretabilityInputError("--config: give the run config(s) the checkpoint was trained with")
    check_configs(configs)
    return Path(checkpoint)


def check_configs(configs: list[str]) -> None:
    """Every config file exists (else an error naming ``--config``)."""
    for c in configs:
        if not Path(c).is_file():
            raise InterpretabilityInputError(f"--config: no file {c}")


def load_stage1_run(checkpoint: str | Path, configs: list[str], overrides: list[str] | None = None,
                    config: dict[str, Any] | None = None) -> Stage1Run:
    """``--ckpt`` + ``--config`` (+ CLI-style overrides) -> ``Stage1Run``; checks that they belong together.
    ``config``: the already resolved config of ``configs`` + ``overrides`` (parsed here when None)."""
    from experiments._config import build, load_config
    from lightning_modules.brain_encoder import BrainEncoderModule
    from lightning_modules.stage1_conditions import _load_stage1

    checkpoint = check_paths(checkpoint, configs)
    config = config if config is not None else load_config(list(configs), overrides)
    model_path = str(config.get("model", {}).get("class_path", ""))
    if not model_path.endswith("BrainEncoderModule"):
        raise InterpretabilityInputError(f"--config: the model is {model_path or 'missing'}, not a stage-1 "
                                         "BrainEncoderModule (these analyses read stage-1 runs)")
    try:
        model = _load_stage1(BrainEncoderModule, str(checkpoint), "--ckpt")
    except Exception as exc:  # noqa: BLE001 - any load failure is the same user error
        raise InterpretabilityInputError(f"--ckpt: {checkpoint} is not a loadable stage-1 checkpoint "
                                         f"({type(exc).__name__}: {exc})") from exc
    model.eval().requires_grad_(False)
    datamodule = build(config["data"])
    voxels = datamodule.num_voxels()
    clashes = [f"{s}: data {v}, checkpoint {model.num_voxels[s]}" for s, v in voxels.items()
               if s in model.num_voxels and model.num_voxels[s] != v]
    if clashes:
        raise InterpretabilityInputError(f"--config: voxel counts differ from the checkpoint's adapters "
                                         f"({'; '.join(clashes)}): wrong data.data_dir or checkpoint?")
    if not any(s in model.num_voxels for s in datamodule.subjects):
        raise InterpretabilityInputError(f"--config: data.subjects {datamodule.subjects} has no subject of the "
                                         f"checkpoint ({sorted(model.num_voxels)})")
    config_target = config["model"].get("init_args", {}).get("target")
    if config_target and config_target != model.hparams.target:
        raise InterpretabilityInputError(f"--config: model.target is {config_target!r} but the checkpoint was "
                                         f"trained on {model.hparams.target!r}")
    return Stage1Run(model, datamodule, config, checkpoint, list(configs))


def check_subject(run: Stage1Run, subject: str | None) -> str:
    """The subject to analyse (default: the config's first subject the checkpoint has an adapter for)."""
    if subject is None:
        return run.default_subject()
    name = subject_name(subject)
    if name not in run.model.num_voxels:
        raise InterpretabilityInputError(f"--subject {subject}: the checkpoint has adapters for "
                                         f"{sorted(run.model.num_voxels)} only")
    if name not in run.datamodule.subjects:
        raise InterpretabilityInputError(f"--subject {subject}: not among the config's data.subjects "
                                         f"{run.datamodule.subjects}")
    return name


def load_test_set(run: Stage1Run, subject: str, max_images: int = 0) -> TestSet:
    """Every valid test image of ``subject`` (ascending nsd_id), all repeats, with the run's target joined."""
    dm = run.datamodule
    dm.set_rank(0, 1)
    dm.setup("test")
    loader = dm.test_dataloader()[dm.subjects.index(subject)]
    voxels, masks, ids, categories, targets = [], [], [], [], []
    for batch in loader:
        valid = batch["valid"]
        voxels.append(batch["voxels"][valid])
        masks.append(batch["repeat_mask"][valid])
        ids.append(batch["nsd_id"][valid].numpy())
        categories += [c for c, v in zip(batch["categories"], valid.tolist()) if v]
        if run.target_name in batch:
            targets.append(batch[run.target_name].reshape(len(valid), -1)[valid])
        if max_images and sum(len(i) for i in ids) >= max_images:
            break
    test = TestSet(subject, torch.cat(voxels).float(), torch.cat(masks).bool(), np.concatenate(ids),
                   categories, torch.cat(targets).float() if targets else None)
    return test.subset(max_images)


def load_roi_info(run: Stage1Run, subject: str) -> RoiInfo:
    """The subject's ROI mask volume (``meta.json`` ``roi_mask``) and ROI labels (``voxel_roi``) when present."""
    import nibabel as nib

    meta = run.datamodule.metas[subject]
    folder = Path(run.datamodule.data_dir) / subject
    info = RoiInfo()
    if meta.get("roi_mask") and (folder / meta["roi_mask"]).is_file():
        image = nib.load(str(folder / meta["roi_mask"]))
        mask = np.asarray(image.dataobj)
        if int((mask > 0).sum()) == int(meta["num_voxels"]):
            info.mask, info.affine = mask, np.asarray(image.affine)
            if meta.get("mean_volume") and (folder / meta["mean_volume"]).is_file():
                mean = np.asarray(nib.load(str(folder / meta["mean_volume"])).dataobj, dtype=np.float32)
                info.background = mean if mean.shape == mask.shape else None
    if meta.get("voxel_roi") and (folder / meta["voxel_roi"]["labels"]).is_file():
        info.labels = np.load(folder / meta["voxel_roi"]["labels"]).astype(np.int64)
        info.names = list(meta["voxel_roi"]["names"])
    return info
