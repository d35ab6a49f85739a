"""A deterministic synthetic NSD-like dataset with a known ground truth (the embedded default).

Images are procedural scenes with known latent factors (category -> object shape, colour, texture, position,
size) plus captions and COCO super-categories that describe them. A test set of images is shared by all
subjects, as in NSD. Each subject has its own voxel count and the same ROI types placed differently in a small
voxel volume: retinotopic low-level voxels (Gaussian receptive fields on the pixels), mid-level voxels (texture,
colour, size), category-selective voxels (one preferred category each) and unresponsive voxels. Responses are
the encoding model plus Gaussian noise scaled per voxel so that the split-half correlation of repeats of a
responsive voxel is drawn from ``reliability`` (default 0.3-0.5, NSD-like); raw betas carry a per-voxel offset
and scale that z-scoring removes.

``generate`` writes our shard format directly; ``write_mindeye2_layout`` writes the same data in the MindEyeV2
release layout so that the importer is tested end to end on it.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.common import DataFormatError, atomic_path, write_json_atomic
from datamodules.subject_writer import TrialTable, WriteOptions, compute_train_stats, write_subject

CATEGORIES = ("animal", "vehicle", "food", "furniture", "sports", "kitchen")
OBJECT_WORDS = ("cat", "car", "cake", "table", "kite", "cup")
SHAPES = ("disc", "square", "triangle", "cross", "ring", "diamond")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220),
           "yellow": (230, 210, 40), "purple": (150, 60, 190), "orange": (240, 140, 30)}
TEXTURES = ("plain", "striped", "spotted")
ROI_NAMES = ("unresponsive", "low_level", "mid_level") + tuple(f"category_{c}" for c in CATEGORIES)
RUNS_PER_SESSION = 12
LOW_GRID = 8


@dataclass
class SyntheticNSDConfig:
    """What to generate. Sizes are small by default (demo and tests); the benchmark asks for 16k voxels, 224 px."""

    seed: int = 0
    voxels: tuple[int, ...] = (1200, 1000, 1400)
    num_sessions: int = 4
    trials_per_session: int = 150
    num_test_images: int = 50
    repeats: int = 3
    image_size: int = 64
    captions_per_image: int = 3
    reliability: tuple[float, float] = (0.3, 0.5)
    unresponsive_fraction: float = 0.15
    roi_fractions: tuple[float, float, float] = field(default=(0.4, 0.25, 0.35))  # low, mid, category

    def subjects(self) -> list[str]:
        return [f"subj{i + 1:02d}" for i in range(len(self.voxels))]


@dataclass
class PlantedFactorsConfig(SyntheticNSDConfig):
    """The interpretability positive control: every ROI type drives one separable latent factor of the scenes
    (``PLANTED_FACTORS``) and nothing else, with high reliability; ``planted_targets`` gives a target that is a
    linear image of the same factors (one orthogonal direction each). ``simulate`` switches on the type, so the
    default config's data (and its random stream) are unchanged."""

    reliability: tuple[float, float] = (0.8, 0.9)
    target_dim: int = 32


@dataclass
class SceneFactors:
    """Latent factors of every image in the universe, arrays (N,)."""

    category: np.ndarray
    colour: np.ndarray
    texture: np.ndarray
    cx: np.ndarray
    cy: np.ndarray
    size: np.ndarray
    background: np.ndarray


def sample_factors(rng: np.random.Generator, n: int) -> SceneFactors:
    return SceneFactors(category=rng.integers(0, len(CATEGORIES), n), colour=rng.integers(0, len(COLOURS), n),
                        texture=rng.integers(0, len(TEXTURES), n), cx=rng.uniform(0.3, 0.7, n),
                        cy=rng.uniform(0.3, 0.7, n), size=rng.uniform(0.14, 0.26, n),
                        background=rng.uniform(0.15, 0.85, n))


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    ax, ay = np.abs(dx), np.abs(dy)
    if shape == "disc":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return (ax <= r * 0.85) & (ay <= r * 0.85)
    if shape == "triangle":
        return (dy <= r * 0.8) & (dy >= -r) & (ax <= (dy + r) * 0.6)
    if shape == "cross":
        return ((ax <= r * 0.3) & (ay <= r)) | ((ay <= r * 0.3) & (ax <= r))
    if shape == "ring":
        d2 = dx**2 + dy**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    return ax + ay <= r  # diamond


def render_image(f: SceneFactors, i: int, size: int) -> np.ndarray:
    """Draw image ``i`` of the factors as (size, size, 3) uint8."""
    coords = (np.arange(size) + 0.5) / size
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    dx, dy = xx - f.cx[i], yy - f.cy[i]
    bg = f.background[i]
    image = np.empty((size, size, 3), np.float32)
    image[...] = (bg + 0.08 * (xx - 0.5))[..., None]
    mask = _shape_mask(SHAPES[f.category[i]], dx, dy, f.size[i])
    colour = np.asarray(list(COLOURS.values())[f.colour[i]], np.float32) / 255.0
    texture = TEXTURES[f.texture[i]]
    if texture == "striped":
        shade = np.where(np.sin(2 * np.pi * 14 * (xx + yy)) > 0, 1.0, 0.45)
    elif texture == "spotted":
        shade = np.where(np.sin(2 * np.pi * 12 * xx) * np.sin(2 * np.pi * 12 * yy) > 0.5, 0.4, 1.0)
    else:
        shade = np.ones_like(xx)
    image[mask] = colour * shade[mask][:, None]
    return np.clip(np.round(image * 255), 0, 255).astype(np.uint8)


def describe(f: SceneFactors, i: int, n_captions: int) -> list[str]:
    """Captions that state the image's factors (several phrasings)."""
    colour = list(COLOURS)[f.colour[i]]
    obj = OBJECT_WORDS[f.category[i]]
    texture = TEXTURES[f.texture[i]]
    size = "small" if f.size[i] < 0.18 else ("large" if f.size[i] > 0.22 else "medium")
    where = ("top" if f.cy[i] < 0.5 else "bottom") + " " + ("left" if f.cx[i] < 0.5 else "right")
    light = "dark" if f.background[i] < 0.5 else "light"
    templates = [
        f"a {size} {colour} {texture} {obj} in the {where}",
        f"a {texture} {colour} {obj} on a {light} background",
        f"a picture of a {obj} that is {colour}, {size} and {texture}",
        f"{colour} {obj} with a {texture} pattern near the {where}",
        f"a {size} {obj} in {colour}",
    ]
    return templates[:n_captions]


def low_level_features(images: np.ndarray) -> np.ndarray:
    """(N, S, S, 3) uint8 -> (N, 8*8*3) mean pixel value per grid cell and channel."""
    n, s = images.shape[:2]
    cell = s // LOW_GRID
    crop = images[:, : cell * LOW_GRID, : cell * LOW_GRID].astype(np.float32) / 255.0
    return crop.reshape(n, LOW_GRID, cell, LOW_GRID, cell, 3).mean((2, 4)).reshape(n, -1)


def mid_level_features(f: SceneFactors) -> np.ndarray:
    """(N, 3 + 6 + 2) texture one-hot, colour one-hot, size and background."""
    return np.concatenate([np.eye(len(TEXTURES))[f.texture], np.eye(len(COLOURS))[f.colour],
                           f.size[:, None] * 5, f.background[:, None]], axis=1)


@dataclass
class SubjectModel:
    """One synthetic subject: voxel volume, ROI labels, encoding weights, noise and raw scale per voxel."""

    name: str
    volume_shape: tuple[int, int, int]
    mask_flat_index: np.ndarray  # (V,) C-order indices of the voxels in the volume
    roi: np.ndarray  # (V,) index into ROI_NAMES
    reliability: np.ndarray  # (V,) target split-half correlation (0 for unresponsive voxels)
    offset: np.ndarray
    scale: np.ndarray

    @property
    def num_voxels(self) -> int:
        return len(self.roi)


def build_subject(rng: np.random.Generator, name: str, n_voxels: int, cfg: SyntheticNSDConfig) -> SubjectModel:
    """Place the ROI types in a voxel blob of ``n_voxels`` along a subject-specific random axis."""
    side = int(np.ceil((n_voxels / 0.45) ** (1 / 3))) + 1
    grid = np.stack(np.meshgrid(*[np.arange(side)] * 3, indexing="ij"), -1).reshape(-1, 3).astype(float)
    stretch = rng.uniform(0.7, 1.3, 3)
    dist = (((grid - (side - 1) / 2) / stretch) ** 2).sum(1) + rng.uniform(0, 1e-3, len(grid))
    flat = np.sort(np.argsort(dist)[:n_voxels])
    coords = grid[flat]
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    order = np.argsort(coords @ axis)
    low, mid, _ = cfg.roi_fractions
    bounds = (np.cumsum([low, mid]) * n_voxels).astype(int)
    roi = np.empty(n_voxels, np.int64)
    roi[order[: bounds[0]]] = ROI_NAMES.index("low_level")
    roi[order[bounds[0]: bounds[1]]] = ROI_NAMES.index("mid_level")
    cat_vox = order[bounds[1]:]
    second = rng.normal(size=3)
    cat_vox = cat_vox[np.argsort(coords[cat_vox] @ second)]
    for k, chunk in enumerate(np.array_split(cat_vox, len(CATEGORIES))):
        roi[chunk] = ROI_NAMES.index(f"category_{CATEGORIES[k]}")
    unresponsive = rng.random(n_voxels) < cfg.unresponsive_fraction
    roi[unresponsive] = ROI_NAMES.index("unresponsive")
    reliability = np.where(unresponsive, 0.0, rng.uniform(*cfg.reliability, n_voxels))
    return SubjectModel(name=name, volume_shape=(side,) * 3, mask_flat_index=flat, roi=roi,
                        reliability=reliability, offset=rng.normal(0, 2, n_voxels),
                        scale=rng.uniform(0.5, 3.0, n_voxels))


def signal(rng: np.random.Generator, subject: SubjectModel, images: np.ndarray, f: SceneFactors) -> np.ndarray:
    """Noise-free responses (N_images, V), each responsive voxel standardised over the image universe."""
    n_vox = subject.num_voxels
    out = np.zeros((len(images), n_vox), np.float32)
    low = low_level_features(images)
    low = (low - low.mean(0)) / (low.std(0) + 1e-6)
    cells = np.stack(np.meshgrid(np.arange(LOW_GRID), np.arange(LOW_GRID), indexing="ij"), -1).reshape(-1, 2)
    sel = subject.roi == ROI_NAMES.index("low_level")
    centres = rng.uniform(0, LOW_GRID - 1, (sel.sum(), 2))
    sigma = rng.uniform(0.6, 1.5, sel.sum())[:, None]
    rf = np.exp(-((centres[:, None, :] - cells[None]) ** 2).sum(-1) / (2 * sigma**2))  # (v, 64)
    channel = rng.dirichlet(np.ones(3), sel.sum())  # colour preference
    weights = (rf[:, :, None] * channel[:, None, :]).reshape(sel.sum(), -1)
    out[:, sel] = low @ weights.T
    mid = mid_level_features(f)
    mid = (mid - mid.mean(0)) / (mid.std(0) + 1e-6)
    sel = subject.roi == ROI_NAMES.index("mid_level")
    out[:, sel] = mid @ rng.normal(size=(mid.shape[1], sel.sum()))
    onehot = np.eye(len(CATEGORIES))[f.category]
    for k, cat in enumerate(CATEGORIES):
        sel = subject.roi == ROI_NAMES.index(f"category_{cat}")
        gain = rng.uniform(0.7, 1.3, sel.sum())
        mix = rng.normal(0, 0.15, (len(CATEGORIES), sel.sum()))
        out[:, sel] = onehot[:, [k]] * gain + onehot @ mix
    responsive = subject.roi != ROI_NAMES.index("unresponsive")
    sig = out[:, responsive]
    out[:, responsive] = (sig - sig.mean(0)) / (sig.std(0) + 1e-6)
    out[:, ~responsive] = 0.0
    return out


PLANTED_FACTORS = {"low_level": "horizontal position (cx)", "mid_level": "object size",
                   **{f"category_{c}": f"category is {c} (0/1)" for c in CATEGORIES}}


def planted_latents(f: SceneFactors) -> np.ndarray:
    """(N, 8) the positive control's latent factors in ``PLANTED_FACTORS`` order, each standardised over the
    image universe: cx, size, then one indicator per category. Independent across ROI types by construction (cx,
    size and category are drawn independently)."""
    z = np.concatenate([f.cx[:, None], f.size[:, None], np.eye(len(CATEGORIES))[f.category]], 1)
    return ((z - z.mean(0)) / (z.std(0) + 1e-6)).astype(np.float32)


def planted_signal(rng: np.random.Generator, subject: SubjectModel, f: SceneFactors) -> np.ndarray:
    """Noise-free responses (N_images, V) of the positive control: a voxel of ROI type r is a positive gain times
    r's latent factor (``planted_latents``), standardised like ``signal``; unresponsive voxels are 0."""
    z = planted_latents(f)
    out = np.zeros((len(z), subject.num_voxels), np.float32)
    for k, name in enumerate(PLANTED_FACTORS):
        sel = subject.roi == ROI_NAMES.index(name)
        out[:, sel] = z[:, [k]] * rng.uniform(0.7, 1.3, sel.sum())
    responsive = subject.roi != ROI_NAMES.index("unresponsive")
    sig = out[:, responsive]
    out[:, responsive] = (sig - sig.mean(0)) / (sig.std(0) + 1e-6)
    return out


def planted_targets(f: SceneFactors, dim: int, seed: int) -> np.ndarray:
    """(N, dim) float32 positive-control targets: the latent factors times a random matrix with orthonormal rows
    (one target direction per factor; ``dim`` >= 8)."""
    z = planted_latents(f)
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(dim, z.shape[1])))
    return (z @ q.T).astype(np.float32)


def design_trials(rng: np.random.Generator, cfg: SyntheticNSDConfig, train_ids: np.ndarray,
                  test_ids: np.ndarray) -> TrialTable:
    """Chronological trials: every test image ``repeats`` times, training images fill the rest (up to
    ``repeats`` each), in random order so that repeats fall in different sessions."""
    total = cfg.num_sessions * cfg.trials_per_session
    n_test = len(test_ids) * cfg.repeats
    if n_test >= total:
        raise DataFormatError("num_test_images * repeats must be below num_sessions * trials_per_session")
    train = np.repeat(train_ids, cfg.repeats)[: total - n_test]
    ids = np.concatenate([np.repeat(test_ids, cfg.repeats), train])
    ids = ids[rng.permutation(total)]
    g = np.arange(total)
    trial = g % cfg.trials_per_session
    return TrialTable(nsd_id=ids.astype(np.int64), session=g // cfg.trials_per_session + 1,
                      run=trial * RUNS_PER_SESSION // cfg.trials_per_session + 1, trial=trial,
                      global_trial=g, is_test=np.isin(ids, test_ids))


@dataclass
class SyntheticNSD:
    """The generated dataset in memory: universe images and factors, per subject trials and normalised betas."""

    cfg: SyntheticNSDConfig
    factors: SceneFactors
    images: np.ndarray  # (N_universe, S, S, 3) uint8, row = nsd_id
    test_ids: np.ndarray
    subjects: dict[str, SubjectModel]
    trials: dict[str, TrialTable]
    raw_betas: dict[str, np.ndarray]  # (T, V) float32, row = global trial

    def captions(self) -> dict[int, list[str]]:
        return {i: describe(self.factors, i, self.cfg.captions_per_image) for i in range(len(self.images))}

    def categories(self) -> dict[int, list[str]]:
        return {i: [CATEGORIES[self.factors.category[i]]] for i in range(len(self.images))}


def universe_sizes(cfg: SyntheticNSDConfig) -> tuple[int, int]:
    """(training images per subject, images in the universe) of ``cfg``."""
    total = cfg.num_sessions * cfg.trials_per_session
    per_subject_train = int(np.ceil((total - cfg.num_test_images * cfg.repeats) / cfg.repeats))
    return per_subject_train, cfg.num_test_images + per_subject_train * len(cfg.voxels)


def universe_factors(cfg: SyntheticNSDConfig) -> SceneFactors:
    """The scene factors of every universe image, as ``simulate`` draws them (the first draws of its stream), with
    nothing rendered: the generated dataset's factors recovered from its config (``synthetic_nsd.json``)."""
    return sample_factors(np.random.default_rng(cfg.seed), universe_sizes(cfg)[1])


def object_masks(f: SceneFactors, ids: np.ndarray, size: int) -> np.ndarray:
    """(n, size, size) bool: the pixels ``render_image`` paints with the object of each image in ``ids``."""
    coords = (np.arange(size) + 0.5) / size
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    return np.stack([_shape_mask(SHAPES[f.category[i]], xx - f.cx[i], yy - f.cy[i], f.size[i]) for i in ids])


def simulate(cfg: SyntheticNSDConfig) -> SyntheticNSD:
    """Generate everything in memory, deterministically from ``cfg.seed``."""
    rng = np.random.default_rng(cfg.seed)
    total = cfg.num_sessions * cfg.trials_per_session
    per_subject_train, n_universe = universe_sizes(cfg)
    factors = sample_factors(rng, n_universe)
    images = np.stack([render_image(factors, i, cfg.image_size) for i in range(n_universe)])
    ids = rng.permutation(n_universe)
    test_ids = np.sort(ids[: cfg.num_test_images])
    subjects, trials, betas = {}, {}, {}
    for s, (name, n_vox) in enumerate(zip(cfg.subjects(), cfg.voxels)):
        own = ids[cfg.num_test_images + s * per_subject_train: cfg.num_test_images + (s + 1) * per_subject_train]
        model = build_subject(rng, name, n_vox, cfg)
        table = design_trials(rng, cfg, own, test_ids)
        sig = planted_signal(rng, model, factors) if isinstance(cfg, PlantedFactorsConfig) else \
            signal(rng, model, images, factors)
        rel = model.reliability
        noise_sd = np.where(rel > 0, np.sqrt((1 - np.maximum(rel, 1e-6)) / np.maximum(rel, 1e-6)), 1.0)
        noise = rng.standard_normal((total, n_vox)).astype(np.float32) * noise_sd.astype(np.float32)
        raw = (sig[table.nsd_id] + noise) * model.scale.astype(np.float32) + model.offset.astype(np.float32)
        subjects[name], trials[name], betas[name] = model, table, raw.astype(np.float32)
    return SyntheticNSD(cfg, factors, images, test_ids, subjects, trials, betas)


class ArraySource:
    """``SubjectSource`` over in-memory arrays (the synthetic generator's betas and images)."""

    def __init__(self, betas: np.ndarray, images: np.ndarray):
        self.betas, self.images = betas, images
        self.num_voxels, self.image_size = betas.shape[1], images.shape[1]

    def read_voxels(self, rows: np.ndarray) -> np.ndarray:
        return self.betas[rows]

    def read_images(self, nsd_ids: np.ndarray) -> np.ndarray:
        return self.images[nsd_ids]


def write_nifti_mask(subject: SubjectModel, path: Path) -> None:
    """The subject's voxel mask (1 inside, 0 outside) as a NIfTI volume, 1.8 mm isotropic like NSD func1pt8mm."""
    import nibabel as nib

    volume = np.zeros(int(np.prod(subject.volume_shape)), np.int16)
    volume[subject.mask_flat_index] = 1
    image = nib.Nifti1Image(volume.reshape(subject.volume_shape), np.diag([1.8, 1.8, 1.8, 1.0]))
    Path(path).write_bytes(gzip.compress(image.to_bytes(), mtime=0))


def _write_npy(array: np.ndarray):
    def writer(path: Path) -> None:
        with open(path, "wb") as handle:
            np.save(handle, array)
    return writer


def generate(cfg: SyntheticNSDConfig, out: str | Path, data: SyntheticNSD | None = None,
             progress: bool = False) -> SyntheticNSD:
    """Write the synthetic dataset in our shard format below ``out`` (one directory per subject)."""
    data = data or simulate(cfg)
    out = Path(out)
    captions, categories = data.captions(), data.categories()
    for name, model in data.subjects.items():
        table = data.trials[name]
        source = ArraySource(data.raw_betas[name], data.images)
        stats = compute_train_stats(source, table.global_trial[~table.is_test])
        options = WriteOptions(
            sessions=list(range(1, cfg.num_sessions + 1)), image_size=cfg.image_size,
            normalisation={"kind": "zscore_train", "stats": "norm_stats.npz",
                           "description": "per-voxel z-score with mean/std of all training (non-test) trials, "
                                          "applied to every trial (as the MindEyeV2 release)"},
            source=f"synthetic seed={cfg.seed}")
        extra = {"roi_mask": "nsdgeneral.nii.gz",
                 "voxel_roi": {"labels": "voxel_roi.npy", "names": list(ROI_NAMES)},
                 "synthetic": {"config": asdict(cfg), "reliability": "voxel_reliability.npy"}}
        write_subject(source, table, out, name, options, stats=stats, captions=captions, categories=categories,
                      extra_meta=extra, progress=progress,
                      extra_files={"nsdgeneral.nii.gz": lambda p, m=model: write_nifti_mask(m, p),
                                   "voxel_roi.npy": _write_npy(model.roi.astype(np.int8)),
                                   "voxel_reliability.npy": _write_npy(model.reliability.astype(np.float32))})
    write_json_atomic(out / "synthetic_nsd.json", {"config": asdict(cfg), "subjects": cfg.subjects(),
                                                   "universe_size": len(data.images),
                                                   "test_ids": data.test_ids.tolist()})
    return data


def write_planted_targets(data: SyntheticNSD, directory: str | Path) -> Path:
    """The positive control's target cache (``planted_targets`` of every universe image) in the data layer's
    target-cache format (``values`` (N, target_dim), joined by nsd_id)."""
    from datamodules.target_cache import write_target_cache

    if not isinstance(data.cfg, PlantedFactorsConfig):
        raise DataFormatError("planted targets exist only for a PlantedFactorsConfig dataset")
    values = planted_targets(data.factors, data.cfg.target_dim, data.cfg.seed + 1)
    return write_target_cache(directory, np.arange(len(values)), values, model="planted latent factors",
                              layer="latents @ orthonormal rows", extra={"factors": list(PLANTED_FACTORS)})


def _behav_rows(table: TrialTable, subject_index: int) -> np.ndarray:
    """(T, 17) MindEyeV2 behaviour rows (float64, -1 = missing) for every trial of one subject."""
    rows = -np.ones((len(table), 17))
    rows[:, 0] = table.nsd_id
    rows[:, 1] = subject_index
    rows[:, 2] = table.session
    rows[:, 3] = table.run
    rows[:, 4] = table.trial + 1
    rows[:, 5] = table.global_trial
    seen: set[int] = set()
    for t, nsd_id in enumerate(table.nsd_id.tolist()):
        rows[t, 7] = float(nsd_id in seen)
        seen.add(nsd_id)
    rows[:, 16] = table.is_test
    return rows


def _write_behav_tar(path: Path, trials: np.ndarray, behav: np.ndarray, table: TrialTable, first_key: int) -> None:
    """A MindEyeV2 behaviour shard: behav (1,17), past/future (15,17) in-session, olds (3,17) other repeats."""
    from datamodules.shard_format import encode_npy, write_shard

    def samples():
        for k, t in enumerate(trials):
            same_session = table.session == table.session[t]
            past = -np.ones((15, 17))
            prev = np.flatnonzero(same_session & (table.global_trial < table.global_trial[t]))[::-1][:15]
            past[: len(prev)] = behav[prev]
            future = -np.ones((15, 17))
            nxt = np.flatnonzero(same_session & (table.global_trial > table.global_trial[t]))[:15]
            future[: len(nxt)] = behav[nxt]
            olds = -np.ones((3, 17))
            others = np.flatnonzero((table.nsd_id == table.nsd_id[t]) & (np.arange(len(table)) != t))[:3]
            olds[: len(others)] = behav[others]
            yield {"__key__": f"sample{first_key + k:09d}", "behav.npy": encode_npy(behav[[t]]),
                   "past_behav.npy": encode_npy(past), "future_behav.npy": encode_npy(future),
                   "olds_behav.npy": encode_npy(olds)}

    write_shard(path, samples())


def write_mindeye2_layout(data: SyntheticNSD, root: str | Path) -> Path:
    """Write the synthetic dataset in the MindEyeV2 release layout (betas renormalised with train-only stats).

    Also writes ``synthetic_layout.json`` (voxel counts per subject, read by the importer's voxel-count check)
    and ``roi/subjXX/nsdgeneral.nii.gz``.
    """
    import h5py

    root = Path(root)
    with atomic_path(root / "coco_images_224_float16.hdf5") as tmp, h5py.File(tmp, "w") as h5:
        h5.create_dataset("images", data=(data.images.transpose(0, 3, 1, 2) / 255.0).astype(np.float16))
    with atomic_path(root / "coco_captions.json") as tmp:
        tmp.write_text(json.dumps({str(k): v for k, v in data.captions().items()}))
    with atomic_path(root / "coco_categories.json") as tmp:
        tmp.write_text(json.dumps({str(k): v for k, v in data.categories().items()}))
    layout: dict[str, Any] = {"kind": "synthetic-mindeye2", "config": asdict(data.cfg), "voxels": {}}
    for s, (name, table) in enumerate(data.trials.items(), start=1):
        raw = data.raw_betas[name]
        train_rows = ~table.is_test
        mean, std = raw[train_rows].mean(0), raw[train_rows].std(0)
        with atomic_path(root / f"betas_all_{name}_fp32_renorm.hdf5") as tmp, h5py.File(tmp, "w") as h5:
            h5.create_dataset("betas", data=((raw - mean) / std).astype(np.float32))
        behav = _behav_rows(table, s)
        counter = 0
        for session in range(1, data.cfg.num_sessions + 1):
            rows = np.flatnonzero((table.session == session) & ~table.is_test)
            _write_behav_tar(root / "wds" / name / "train" / f"{session - 1}.tar", rows, behav, table, counter)
            counter += len(rows)
        _write_behav_tar(root / "wds" / name / "new_test" / "0.tar", np.flatnonzero(table.is_test), behav,
                         table, 0)
        mask_path = root / "roi" / name / "nsdgeneral.nii.gz"
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(mask_path) as tmp:
            write_nifti_mask(data.subjects[name], tmp)
        layout["voxels"][name] = data.subjects[name].num_voxels
    write_json_atomic(root / "synthetic_layout.json", layout)
    return root


def split_half_reliability(betas: np.ndarray, trials: TrialTable) -> np.ndarray:
    """Per-voxel Pearson correlation between the first and second presentation of every image seen twice or
    more (NSD-style split-half reliability), (T, V) betas -> (V,)."""
    first, second = [], []
    for nsd_id in np.unique(trials.nsd_id):
        rows = np.sort(trials.global_trial[trials.nsd_id == nsd_id])
        if len(rows) >= 2:
            first.append(rows[0])
            second.append(rows[1])
    a, b = betas[first].astype(np.float64), betas[second].astype(np.float64)
    a, b = a - a.mean(0), b - b.mean(0)
    return (a * b).sum(0) / np.sqrt((a**2).sum(0) * (b**2).sum(0))
