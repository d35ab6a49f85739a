"""Spatial routing over the denoising trajectory of reconstructions: per expert, where in the image it is routed.

Source: a stage-2 ``predict`` output (``<subject>/routing/<nsd_id>.npz`` with ``{branch}_spatial_level{l}``
(steps, G, E_l) and ``timesteps`` (steps,), ``<subject>/images/<nsd_id>.png``; ``callbacks.reconstruction_writer``),
or reconstructions run here for chosen ids with the module (the same ``reconstruct`` as ``predict``). The G = g x g
cell maps are upsampled (nearest: one cell, one block) to a tile of fixed size whatever the image resolution and
alpha-blended on the reconstruction and, when the data is given, on the ground-truth image.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from datamodules.shard_format import subject_name
from datamodules.streams import EvalStream
from experiments.interpretability.loading import InterpretabilityInputError
from experiments.interpretability.outputs import write_csv, write_npz, write_png
from experiments.interpretability.report import ReportItem

# inferno-like ramp (0 -> dark, 1 -> light yellow) and a categorical palette (tab20) for winning experts
RAMP = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32) / 255
PALETTE = np.array([[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189], [140, 86, 75],
                    [227, 119, 194], [127, 127, 127], [188, 189, 34], [23, 190, 207], [174, 199, 232],
                    [255, 187, 120], [152, 223, 138], [255, 152, 150], [197, 176, 213], [196, 156, 148],
                    [247, 182, 210], [199, 199, 199], [219, 219, 141], [158, 218, 229]], dtype=np.float32) / 255
LABEL_W, LABEL_H, GAP = 92, 28, 4


def colour_ramp(values: np.ndarray) -> np.ndarray:
    """(...) values in [0, 1] -> (..., 3) RGB in [0, 1]."""
    x = np.clip(values, 0, 1) * (len(RAMP) - 1)
    lo = np.minimum(x.astype(int), len(RAMP) - 2)
    frac = (x - lo)[..., None]
    return RAMP[lo] * (1 - frac) + RAMP[lo + 1] * frac


def upsample_cells(maps: np.ndarray, size: int) -> np.ndarray:
    """(..., G) cell values of a g x g grid (row-major, as the router pools the latent) -> (..., size, size)."""
    g = int(round(np.sqrt(maps.shape[-1])))
    if g * g != maps.shape[-1]:
        raise InterpretabilityInputError(f"spatial maps have {maps.shape[-1]} cells, not a square grid")
    idx = np.arange(size) * g // size
    grid = maps.reshape(*maps.shape[:-1], g, g)
    return grid[..., idx[:, None], idx[None, :]]


def select_steps(num_steps: int, steps: int | Sequence[int]) -> np.ndarray:
    """Denoising step indices shown: ``steps`` evenly spaced ones (first and last included) or the given list."""
    if isinstance(steps, int):
        if steps < 1:
            raise InterpretabilityInputError(f"--steps must be at least 1, got {steps}")
        return np.unique(np.linspace(0, num_steps - 1, min(steps, num_steps)).round().astype(int))
    chosen = np.array([int(s) for s in steps], dtype=int)
    bad = chosen[(chosen < 0) | (chosen >= num_steps)]
    if len(bad) or not len(chosen):
        raise InterpretabilityInputError(f"--step-indices {list(steps)}: denoising step indices must lie in "
                                         f"0..{num_steps - 1} (the trajectory has {num_steps} steps)")
    return chosen


def tile_image(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) float in [0, 1]."""
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC), dtype=np.float32) / 255


def expert_overlays(base: np.ndarray, maps: list[np.ndarray], steps: np.ndarray, tile: int, alpha: float
                    ) -> tuple[list[np.ndarray], list[float]]:
    """Base (tile, tile, 3) in [0, 1], per-level maps [(S, G, E_l)] -> per level overlays (E_l, k, tile, tile, 3)
    (colour 0 .. the level's largest shown weight) and that largest weight per level."""
    out, vmax = [], []
    for m in maps:
        shown = m[steps].transpose(2, 0, 1)  # (E_l, k, G)
        top = float(shown.max()) if shown.size else 1.0
        colour = colour_ramp(upsample_cells(shown, tile) / max(top, 1e-12))
        out.append((1 - alpha) * base + alpha * colour)
        vmax.append(top)
    return out, vmax


def winner_overlays(base: np.ndarray, maps: list[np.ndarray], steps: np.ndarray, tile: int, alpha: float
                    ) -> np.ndarray:
    """Per cell the expert with the largest weight of each level, as a palette colour: (L, k, tile, tile, 3)."""
    rows = []
    for m in maps:
        winners = upsample_cells(m[steps].argmax(-1), tile)  # (k, tile, tile)
        rows.append((1 - alpha) * base + alpha * PALETTE[winners % len(PALETTE)])
    return np.stack(rows)


def compose(rows: list[tuple[str, np.ndarray]], columns: list[str], base: tuple[str, np.ndarray],
            separators: set[int]) -> np.ndarray:
    """Labelled grid: a header with column labels, the plain base tile, then one row of tiles (k, t, t, 3) per
    (label, tiles); a gap before each row index in ``separators``."""
    tile = base[1].shape[0]
    k = len(columns)
    heights = [LABEL_H, tile + GAP] + [tile + (GAP if i in separators else 0) for i in range(len(rows))]
    canvas = np.full((sum(heights), LABEL_W + k * tile, 3), 255, dtype=np.uint8)
    to_u8 = lambda x: (np.clip(x, 0, 1) * 255).round().astype(np.uint8)  # noqa: E731
    y = LABEL_H
    canvas[y:y + tile, LABEL_W:LABEL_W + tile] = to_u8(base[1])
    y += tile + GAP
    label_at = [(base[0], LABEL_H + tile // 2 - 6)]
    for i, (label, tiles) in enumerate(rows):
        y += GAP if i in separators else 0
        canvas[y:y + tile, LABEL_W:] = to_u8(tiles.transpose(1, 0, 2, 3).reshape(tile, k * tile, 3))
        label_at.append((label, y + tile // 2 - 6))
        y += tile
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    for label, ly in label_at:
        draw.text((3, ly), label, fill=(0, 0, 0))
    for j, text in enumerate(columns):
        for line, part in enumerate(text.split("\n")):
            draw.text((LABEL_W + j * tile + 3, 2 + 12 * line), part, fill=(0, 0, 0))
    return np.asarray(image)


def branch_maps(routing: dict[str, np.ndarray], branch: str) -> list[np.ndarray]:
    """``{branch}_spatial_level{l}`` arrays (S, G, E_l) of one image's routing, by level."""
    maps, level = [], 0
    while f"{branch}_spatial_level{level}" in routing:
        maps.append(np.asarray(routing[f"{branch}_spatial_level{level}"], dtype=np.float32))
        level += 1
    return maps


# ------------------------------------------------------------------ sources
def predict_subject_dir(predict_dir: Path, subject: str | None) -> Path:
    """The writer's ``<subject>`` directory under ``predict_dir`` (or ``predict_dir`` itself)."""
    predict_dir = Path(predict_dir)
    if not predict_dir.is_dir():
        raise InterpretabilityInputError(f"--predict-dir {predict_dir}: no such directory (the reconstructions "
                                         "directory of `python -m experiments.run predict`)")
    if (predict_dir / "routing").is_dir():
        return predict_dir
    candidates = sorted(d for d in predict_dir.iterdir() if (d / "routing").is_dir())
    if subject is not None:
        wanted = predict_dir / subject_name(subject)
        if wanted not in candidates:
            raise InterpretabilityInputError(f"--predict-dir {predict_dir} has no routing of "
                                             f"{subject_name(subject)} (subjects there: "
                                             f"{[d.name for d in candidates] or 'none'})")
        return wanted
    if len(candidates) != 1:
        raise InterpretabilityInputError(f"--predict-dir {predict_dir}: expected one <subject>/routing directory, "
                                         f"found {[d.name for d in candidates] or 'none'} (choose with --subject)")
    return candidates[0]


def choose_ids(available: Sequence[int], ids: Sequence[int] | None, max_images: int, where: str) -> list[int]:
    """``ids`` (all must be available) or the first ``max_images`` available ids."""
    available = sorted(int(i) for i in available)
    if not available:
        raise InterpretabilityInputError(f"no images with routing in {where}")
    if ids is None:
        return available[:max_images]
    missing = sorted(set(int(i) for i in ids) - set(available))
    if missing:
        raise InterpretabilityInputError(f"--ids {missing[:5]} not in {where} ({len(available)} images, e.g. "
                                         f"{available[:5]})")
    return [int(i) for i in ids]


def read_predict_dir(directory: Path, ids: Sequence[int] | None, max_images: int
                     ) -> tuple[str, dict[int, dict[str, np.ndarray]], dict[int, np.ndarray]]:
    """-> (subject, routing per id, reconstruction (H, W, 3) uint8 per id) from a writer's subject directory."""
    manifest = directory / "manifest.json"
    subject = json.loads(manifest.read_text()).get("subject") if manifest.is_file() else None
    have = {int(p.stem) for p in (directory / "routing").glob("*.npz")} & {
        int(p.stem) for p in (directory / "images").glob("*.png")}
    chosen = choose_ids(have, ids, max_images, f"--predict-dir {directory}")
    routing, recons = {}, {}
    for i in chosen:
        with np.load(directory / "routing" / f"{i:05d}.npz") as data:
            routing[i] = {k: data[k] for k in data.files}
        recons[i] = np.asarray(Image.open(directory / "images" / f"{i:05d}.png").convert("RGB"))
    return subject or directory.name, routing, recons


def split_shards(datamodule, subject: str) -> list[tuple[str, list[int]]]:
    """(shard, nsd_ids) of the split ``predict`` iterates (``data.predict_split``) for ``subject``."""
    if not hasattr(datamodule, "targets"):
        datamodule.setup("predict")  # metadata and target caches
    if subject not in datamodule.subjects:
        raise InterpretabilityInputError(f"--subject {subject}: not among the config's data.subjects "
                                         f"{datamodule.subjects}")
    if datamodule.predict_split == "val":
        datamodule.prepare_data()  # the validation shard is materialised on first use
        return datamodule._val_shards(subject)
    return datamodule._test_shards(subject)


def split_batch(datamodule, subject: str, ids: Sequence[int] | None, max_images: int
                ) -> tuple[list[int], dict]:
    """One batch (voxels (n, R, V), repeat_mask, image (n, 3, H, W), nsd_id) of the chosen images of the split
    ``predict`` iterates; only those samples are decoded."""
    shards = split_shards(datamodule, subject)
    chosen = choose_ids([i for _, s in shards for i in s], ids, max_images,
                        f"the {datamodule.predict_split} split of {subject}")
    wanted = set(chosen)
    shards = [(url, [i for i in s if i in wanted]) for url, s in shards]
    stream = EvalStream([s for s in shards if s[1]], subject=subject, batch_size=len(chosen), rank=0, world_size=1,
                        max_repeats=int(datamodule.metas[subject]["max_repeats"]),
                        pad_repeats=datamodule.pad_repeats, load_images=True, targets=datamodule.targets)
    return sorted(chosen), next(iter(stream))


@torch.no_grad()
def run_reconstructions(module, batch: dict, subject: str, inference_steps: int | None
                        ) -> tuple[dict[int, dict[str, np.ndarray]], dict[int, np.ndarray]]:
    """Reconstruct a batch as ``predict`` does -> routing per id (``{key}`` (steps, ...), ``timesteps``) and the
    reconstruction (H, W, 3) uint8 per id."""
    module.eval()
    device = module.device
    sub = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    experts = module.expert_embeddings(sub, subject)
    images, routing = module.reconstruct(experts, subject, batch["nsd_id"].cpu(), steps=inference_steps)
    images = to_uint8(images)
    out_routing, recons = {}, {}
    for row, i in enumerate(batch["nsd_id"].tolist()):
        out_routing[i] = {k: (v.numpy() if k == "timesteps" else v[:, row].numpy()) for k, v in routing.items()}
        recons[i] = images[row]
    return out_routing, recons


def truth_images(datamodule, subject: str, ids: Sequence[int]) -> dict[int, np.ndarray]:
    """Ground-truth (H, W, 3) uint8 of the ids found in the predict split (others are left out)."""
    if datamodule is None or subject not in datamodule.subjects:
        return {}
    split = {i for _, s in split_shards(datamodule, subject) for i in s}
    found = [i for i in ids if i in split]
    if not found:
        return {}
    _, batch = split_batch(datamodule, subject, found, len(found))
    return dict(zip(batch["nsd_id"].tolist(), to_uint8(batch["image"])))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(n, 3, H, W) in [0, 1] -> (n, H, W, 3) uint8 (rounded, as ``predict`` writes them)."""
    return (images.float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


# ------------------------------------------------------------------ the analysis
Source = tuple[str, dict[int, dict[str, np.ndarray]], dict[int, np.ndarray], dict[int, np.ndarray], str]


def load_source(predict_dir: Path | None, module, datamodule, subject: str | None, ids: Sequence[int] | None,
                max_images: int, inference_steps: int | None) -> Source:
    """-> (subject, routing per id, reconstruction per id, ground truth per id (may be empty), description)."""
    if predict_dir is not None:
        subject, routing, recons = read_predict_dir(predict_subject_dir(Path(predict_dir), subject), ids, max_images)
        subject = subject_name(subject)
        return subject, routing, recons, truth_images(datamodule, subject, list(routing)), \
            f"predict output {predict_dir}"
    if module is None or datamodule is None:
        raise InterpretabilityInputError("--predict-dir: give a stage-2 predict output, or a stage-2 --config and "
                                         "--ckpt to reconstruct the chosen --ids here")
    subject = subject_name(subject or datamodule.subjects[0])
    _, batch = split_batch(datamodule, subject, ids, max_images)
    if not module.hparams.resolution:  # predict takes the stored image size from its trainer's data module
        module.hparams.resolution = int(datamodule.metas[subject]["image_size"])
    routing, recons = run_reconstructions(module, batch, subject, inference_steps)
    truths = dict(zip(batch["nsd_id"].tolist(), to_uint8(batch["image"])))
    steps = len(next(iter(routing.values()))["timesteps"])
    return subject, routing, recons, truths, f"reconstructions run here ({steps} sampler steps)"


def draw_branch(stem: str, maps: list[np.ndarray], bases: dict[str, np.ndarray], shown: np.ndarray,
                columns: list[str], out_dir: Path, tile: int, alpha: float) -> list[str]:
    """One branch of one image: per-expert overlays on every base image and the winners figure; -> PNG names."""
    names = []
    for kind, image in bases.items():
        base = tile_image(image, tile)
        overlays, vmax = expert_overlays(base, maps, shown, tile, alpha)
        rows, separators = [], set()
        for level, (level_tiles, top) in enumerate(zip(overlays, vmax)):
            separators.add(len(rows))
            rows += [(f"L{level} e{e} <={top:.2f}", t) for e, t in enumerate(level_tiles)]
        names.append(f"{stem}_{kind}.png")
        label = "reconstruction" if kind == "recon" else "ground truth"
        write_png(out_dir / names[-1], compose(rows, columns, (label, base), separators))
    base = tile_image(bases["recon"], tile)
    winners = winner_overlays(base, maps, shown, tile, alpha)
    names.append(f"{stem}_winners.png")
    write_png(out_dir / names[-1], compose([(f"L{lvl} winner", w) for lvl, w in enumerate(winners)], columns,
                                           ("reconstruction", base), set()))
    return names


def expert_summary(maps: list[np.ndarray]) -> list[tuple[int, int, float, float]]:
    """(level, expert, mean weight over steps and cells, fraction of (step, cell) pairs it wins in its level)."""
    rows = []
    for level, m in enumerate(maps):
        wins = np.bincount(m.argmax(-1).ravel(), minlength=m.shape[-1]) / (m.shape[0] * m.shape[1])
        rows += [(level, e, float(w), float(f)) for e, (w, f) in enumerate(zip(m.mean((0, 1)), wins))]
    return rows


def spatial_routing(out_dir: Path, predict_dir: Path | None = None, module=None, datamodule=None,
                    subject: str | None = None, ids: Sequence[int] | None = None, max_images: int = 4,
                    steps: int | Sequence[int] = 6, tile: int = 96, alpha: float = 0.55,
                    inference_steps: int | None = None) -> list[ReportItem]:
    """Per image and branch: figures of every expert's spatial map over the chosen denoising steps, overlaid on
    the reconstruction (``spatial_{subject}_{id}_{branch}_recon.png``) and the ground truth (``..._truth.png``,
    when ``datamodule`` is given), the winning expert per cell and level (``..._winners.png``); arrays
    ``spatial_routing/{subject}_{id}.npz`` (the maps (S, G, E_l) of every step, ``timesteps``, ``steps_shown``,
    ``reconstruction``, ``truth``) and ``spatial_routing_summary.csv``.

    ``predict_dir`` (a ``predict`` output) is read as written; without it the module reconstructs the chosen
    ``ids`` (default: the first ``max_images`` of the predict split) of ``subject`` from ``datamodule``."""
    out_dir = Path(out_dir)
    if tile < 8:
        raise InterpretabilityInputError(f"--tile must be at least 8 pixels, got {tile}")
    subject, routing, recons, truths, source = load_source(predict_dir, module, datamodule, subject, ids,
                                                           max_images, inference_steps)
    summary: list[list] = []
    items: list[ReportItem] = []
    for i in sorted(routing):
        r = routing[i]
        timesteps = np.asarray(r["timesteps"], dtype=np.float32)
        branches = [b for b in ("image", "text") if f"{b}_spatial_level0" in r]
        if not branches:
            raise InterpretabilityInputError(f"image {i} of {source} has no spatial routing maps (no branch has a "
                                             "spatial router): nothing to draw")
        shown = select_steps(len(timesteps), steps)
        columns = [f"step {s}\nt={timesteps[s]:.0f}" for s in shown]
        bases = {"recon": recons[i], **({"truth": truths[i]} if i in truths else {})}
        figures = []
        for branch in branches:
            maps = branch_maps(r, branch)
            figures += draw_branch(f"spatial_{subject}_{i:05d}_{branch}", maps, bases, shown, columns, out_dir,
                                   tile, alpha)
            summary += [[subject, i, branch, *row] for row in expert_summary(maps)]
        arrays = {k: v for k, v in r.items() if "_spatial_level" in k}
        extra = {"reconstruction": recons[i], **({"truth": truths[i]} if i in truths else {})}
        write_npz(out_dir / "spatial_routing" / f"{subject}_{i:05d}.npz", timesteps=timesteps, steps_shown=shown,
                  **arrays, **extra)
        g = int(round(np.sqrt(maps[0].shape[1])))
        items.append(ReportItem(
            f"Spatial routing: {subject} image {i}",
            f"Branches {', '.join(branches)}; {len(timesteps)} denoising steps, {len(shown)} shown (columns, with "
            "the sampler timestep t). Rows: every expert of every level (L = level, e = expert); each cell of the "
            f"{g} x {g} routing grid is one block, coloured from 0 (dark) to the level's largest shown weight (in "
            "the row label) and blended on the image. 'winners': per level, the expert with the largest weight in "
            f"each cell (one colour per expert). Arrays: spatial_routing/{subject}_{i:05d}.npz.", figures))
    write_csv(out_dir / "spatial_routing_summary.csv",
              ["subject", "nsd_id", "branch", "level", "expert", "mean_weight", "win_fraction"], summary)
    intro = ReportItem(
        "Spatial routing",
        f"Spatial routing maps (weights over each level's experts per latent grid cell) over the denoising "
        f"trajectory of {len(routing)} reconstructions of {subject}, from {source}. Summary per expert: mean weight "
        "over steps and cells, and the fraction of (step, cell) pairs it wins within its level.",
        [], ["spatial_routing_summary.csv"])
    return [intro, *items]
