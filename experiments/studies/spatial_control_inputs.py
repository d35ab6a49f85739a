"""What the spatial positive control reads: the routing of a stage-2 ``predict`` output, each test image's object
per routing cell (from the synthetic dataset's planted factors) and each branch's retinotopic experts (from its
stage-1 encoder and the planted voxel ROI labels).

Retinotopic experts, at every level alike: an expert's voxel map is the mean over the subject's test images of
|integrated gradients| of its backbone-head output with respect to the voxels (``attribution``, objective
``backbone_sum``: no target needed; every level has one, unlike the adapter-weight maps of level 0 only). Its
low-level share is the share of that map's mass on the voxels labelled ``low_level`` (``voxel_roi.npy``), averaged
over the subjects; an expert is retinotopic when its share exceeds the mean share of its level, so a level has both
kinds unless all its experts are alike (the shares are reported: a small spread means a weak label). Lineage
alone (a child inherits its level-0 ancestor's label) is no substitute: on the demo's encoders the two level-0
experts' adapter maps put the same share (0.300 / 0.300) on low-level voxels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from datamodules.shard_format import subject_name
from experiments.interpretability.loading import InterpretabilityInputError

BRANCHES = ("image", "text")


@dataclass
class Routing:
    """Spatial routing of every image of the predict output: ``maps[branch][level]`` (N, S, G, E_l) float32,
    ``subject`` (N,) str, ``nsd_id`` (N,) int, ``timesteps`` (S,)."""

    maps: dict[str, list[np.ndarray]]
    subject: np.ndarray
    nsd_id: np.ndarray
    timesteps: np.ndarray

    @property
    def grid(self) -> int:
        cells = next(iter(self.maps.values()))[0].shape[2]
        g = int(round(np.sqrt(cells)))
        if g * g != cells:
            raise InterpretabilityInputError(f"--predict: spatial maps have {cells} cells, not a square grid")
        return g


def read_routing(predict_dir: Path, subjects: list[str] | None = None) -> Routing:
    """``<predict_dir>/<subject>/routing/<nsd_id>.npz`` of every subject (or the chosen ones) -> ``Routing``."""
    predict_dir = Path(predict_dir)
    if not predict_dir.is_dir():
        raise InterpretabilityInputError(f"--predict {predict_dir}: no such directory (the reconstructions "
                                         "directory of `python -m experiments.run predict`)")
    found = sorted(d.name for d in predict_dir.iterdir() if (d / "routing").is_dir())
    chosen = [subject_name(s) for s in subjects] if subjects else found
    missing = [s for s in chosen if s not in found]
    if missing or not chosen:
        raise InterpretabilityInputError(f"--predict {predict_dir}: no <subject>/routing for "
                                         f"{missing or 'any subject'} (found {found or 'none'})")
    per_key: dict[str, list[np.ndarray]] = {}
    subject, ids, timesteps = [], [], None
    for s in chosen:
        for path in sorted((predict_dir / s / "routing").glob("*.npz")):
            with np.load(path) as data:
                keys = [k for k in data.files if "_spatial_level" in k]
                for k in keys:
                    per_key.setdefault(k, []).append(data[k])
                timesteps = data["timesteps"] if timesteps is None else timesteps
            subject.append(s)
            ids.append(int(path.stem))
    if not per_key:
        raise InterpretabilityInputError(f"--predict {predict_dir}: no spatial routing maps (no branch has a "
                                         "spatial router, or no images)")
    maps = {}
    for branch in BRANCHES:
        levels = sorted(int(k.rsplit("level", 1)[1]) for k in per_key if k.startswith(f"{branch}_spatial_level"))
        if levels:
            maps[branch] = [np.stack(per_key[f"{branch}_spatial_level{lvl}"]).astype(np.float32) for lvl in levels]
    return Routing(maps, np.array(subject), np.array(ids), np.asarray(timesteps, np.float32))


def dataset_config(data_dir: Path):
    """The generator config of a synthetic dataset (``synthetic_nsd.json``), checked against its universe."""
    from datamodules.synthetic import SyntheticNSDConfig, universe_sizes

    path = Path(data_dir) / "synthetic_nsd.json"
    if not path.is_file():
        raise InterpretabilityInputError(f"--data {data_dir}: no synthetic_nsd.json (this control needs the "
                                         "synthetic dataset, whose object positions are planted)")
    record = json.loads(path.read_text())
    names = {f.name for f in fields(SyntheticNSDConfig)}
    cfg = SyntheticNSDConfig(**{k: tuple(v) if isinstance(v, list) else v
                                for k, v in record["config"].items() if k in names})
    if universe_sizes(cfg)[1] != int(record["universe_size"]):
        raise InterpretabilityInputError(f"--data {data_dir}: synthetic_nsd.json's config does not give its "
                                         f"universe of {record['universe_size']} images")
    return cfg


def cell_pool(size: int, grid: int) -> np.ndarray:
    """(size, grid) matrix averaging pixel rows (or columns) into ``grid`` cells, as adaptive pooling does when
    ``grid`` divides ``size`` (pixel p lies in cell p * grid // size)."""
    onehot = np.eye(grid)[np.arange(size) * grid // size]
    return onehot / onehot.sum(0, keepdims=True)


def object_coverage(data_dir: Path, nsd_id: np.ndarray, grid: int) -> np.ndarray:
    """(N, G) share of each routing cell's pixels (row-major, as the router pools the latent) that the image's
    object covers, from the planted factors."""
    from datamodules.synthetic import object_masks, universe_factors

    cfg = dataset_config(data_dir)
    factors = universe_factors(cfg)
    if nsd_id.max(initial=0) >= len(factors.cx):
        raise InterpretabilityInputError(f"--data {data_dir}: image ids up to {int(nsd_id.max())} are not in its "
                                         f"universe of {len(factors.cx)} (another dataset's predict output?)")
    pool = cell_pool(cfg.image_size, grid)
    masks = object_masks(factors, nsd_id, cfg.image_size).astype(np.float64)
    return np.einsum("pr,npq,qc->nrc", pool, masks, pool).reshape(len(nsd_id), grid * grid)


@dataclass
class ExpertLabels:
    """One branch's encoder: per level ``share`` (E_l,) low-level share of each expert's voxel map (mean over
    ``subjects``) and ``retinotopic`` (E_l,) bool."""

    checkpoint: str
    subjects: list[str]
    share: list[np.ndarray]
    retinotopic: list[np.ndarray]


def expert_labels(checkpoint: Path, data_dir: Path, subjects: list[str], option: str, ig_steps: int = 4
                  ) -> ExpertLabels:
    """Retinotopic experts of a stage-1 encoder (module docstring) over the test sets of ``subjects``."""
    from datamodules.nsd import NSDDataModule
    from experiments.interpretability.attribution import attribute_test_set
    from experiments.interpretability.loading import Stage1Run, load_roi_info, load_test_set
    from lightning_modules.brain_encoder import BrainEncoderModule
    from lightning_modules.stage1_conditions import _load_stage1

    if not Path(checkpoint).is_file():
        raise InterpretabilityInputError(f"{option}: no stage-1 checkpoint at {checkpoint}")
    model = _load_stage1(BrainEncoderModule, str(checkpoint), option).eval().requires_grad_(False)
    have = [str(s) for s in subjects if s in model.num_voxels]
    if not have:
        raise InterpretabilityInputError(f"{option}: {checkpoint} has adapters for {sorted(model.num_voxels)}, "
                                         f"none of the routed subjects {subjects}")
    datamodule = NSDDataModule(str(data_dir), subjects=have, num_workers=0, val_images=0, load_images=False)
    run = Stage1Run(model, datamodule, {}, Path(checkpoint), [])
    shares = []
    for s in have:
        test = load_test_set(run, s)  # sets the data module up (its metadata) first
        roi = load_roi_info(run, s)
        if roi.labels is None or "low_level" not in roi.names:
            raise InterpretabilityInputError(f"--data {data_dir}: {s} has no low_level voxel_roi labels")
        ig = attribute_test_set(model.moe, model.adapters, s, test, ig_steps, "backbone_sum", max_rows=1 << 15)
        low = roi.labels == roi.names.index("low_level")
        mass = ig.mean_abs[ig.levels >= 0]  # (sum E_l, V), levels in order
        shares.append(mass[:, low].sum(1) / np.maximum(mass.sum(1), 1e-12))
    share = np.split(np.mean(shares, 0), np.cumsum(model.moe.num_experts)[:-1])
    return ExpertLabels(str(checkpoint), have, share, [s > s.mean() for s in share])
