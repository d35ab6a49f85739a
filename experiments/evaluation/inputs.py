"""Inputs of the evaluation: a subject's test images from the data layer, the reconstructions and stage-1
embeddings, all in ascending ``nsd_id`` order.

- Ground truth: the images of the subject's test shards (``meta.json`` ``test``), decoded once and kept as
  uint8 at their stored size (the data layer stores at most 224 px), ascending ``nsd_id``. Only the test shards
  are read (``experiments.caching.targets.unique_images`` would decode every training image too).
- Reconstructions: one image per test ``nsd_id`` named ``<nsd_id>.png`` (``%05d`` or any zero padding; ``.jpg``
  also accepted), looked up in ``DIR/<subject>/images`` (stage-2 ``predict`` output), ``DIR/<subject>``, and,
  when one subject is evaluated, ``DIR/images`` and ``DIR``. A missing id is an error; files whose name is not an
  integer (e.g. several samples per image) are ignored and counted: the evaluation never chooses among samples.
  Reconstructions of at most 256 px are kept in memory (uint8) after the first read; larger ones are decoded
  again for each pass, so memory stays within N x 256 x 256 x 3 bytes per side.
- Embeddings: stage-1 ``predict`` output ``DIR/<subject>.npz`` (``nsd_id`` plus (N, ...) arrays); rows are
  matched by ``nsd_id``.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from datamodules.common import DataFormatError
from datamodules.shard_format import IMAGE_KEYS, INFO_KEY, decode_image, load_subject_meta, subject_name

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MEMORY_SIDE = 256


class EvaluationInputError(DataFormatError):
    """Bad evaluation input (missing reconstructions or embeddings, an unknown option, missing weights under
    ``--strict``); the message names the file or option."""


def test_ids(data_dir: str | Path, subject: str | int) -> np.ndarray:
    """The subject's test ``nsd_id``s (meta.json ``test``), ascending."""
    meta = load_subject_meta(data_dir, subject)
    ids = [int(i) for shard in meta["test"]["shards"] for i in shard["nsd_ids"]]
    if len(set(ids)) != len(ids):
        raise EvaluationInputError(f"{subject_name(subject)}: meta.json test lists an nsd_id twice")
    return np.array(sorted(ids), dtype=np.int64)


def load_test_images(data_dir: str | Path, subject: str | int) -> tuple[np.ndarray, list[np.ndarray]]:
    """(ids ascending, [(H, W, 3) uint8]) of the subject's test images, read from its test shards only."""
    name = subject_name(subject)
    meta = load_subject_meta(data_dir, name)
    images: dict[int, np.ndarray] = {}
    for shard in meta["test"]["shards"]:
        path = Path(data_dir) / meta["subject"] / shard["shard"]
        for info, payload in _test_samples(path):
            images[int(info["nsd_id"])] = decode_image(payload)
    ids = test_ids(data_dir, name)
    missing = [int(i) for i in ids if int(i) not in images]
    if missing:
        raise EvaluationInputError(f"{name}: test shards lack the images of nsd_ids {missing[:5]}"
                                   f"{'...' if len(missing) > 5 else ''} listed in meta.json")
    return ids, [images[int(i)] for i in ids]


def _test_samples(path: Path) -> Iterator[tuple[dict, bytes]]:
    """(info json, image bytes) of every sample of one shard; voxels are skipped unread."""
    members: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(path, "r") as tar:
            for member in tar:
                if not member.isfile() or "." not in member.name:
                    continue
                key, suffix = member.name.split(".", 1)
                if suffix != INFO_KEY and suffix not in IMAGE_KEYS:
                    continue
                handle = tar.extractfile(member)
                members.setdefault(key, {})[suffix] = handle.read() if handle else b""
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataFormatError(f"cannot read test shard {path}: {exc} (truncated or corrupt file?)") from exc
    for key, sample in members.items():
        payload = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
        if INFO_KEY not in sample or payload is None:
            raise DataFormatError(f"{path} (key {key}) lacks its json or image member")
        yield json.loads(sample[INFO_KEY]), payload


def find_reconstructions(recons_dir: str | Path, subject: str | int, ids: np.ndarray, single_subject: bool,
                         ) -> tuple[list[Path], dict[str, int]]:
    """Paths of the reconstruction of every id (in ``ids`` order) and a note of ignored files."""
    name = subject_name(subject)
    root = Path(recons_dir)
    candidates = [root / name / "images", root / name] + ([root / "images", root] if single_subject else [])
    folder = next((c for c in candidates if c.is_dir() and _image_files(c)), None)
    if folder is None:
        raise EvaluationInputError(f"--recons: no reconstructions for {name}: looked for <nsd_id>.png in "
                                   f"{', '.join(str(c) for c in candidates)}")
    by_id, ignored = {}, 0
    for path in _image_files(folder):
        try:
            nsd_id = int(path.stem)
        except ValueError:
            ignored += 1
            continue
        if nsd_id in by_id:  # 1.png and 000001.png (or 1.jpg): which one is meant is not ours to guess
            raise EvaluationInputError(f"--recons: {by_id[nsd_id]} and {path} are both the reconstruction of nsd_id "
                                       f"{nsd_id} of {name}: keep one")
        by_id[nsd_id] = path
    missing = [int(i) for i in ids if int(i) not in by_id]
    if missing:
        raise EvaluationInputError(f"--recons: {folder} lacks the reconstructions of {len(missing)} of {len(ids)} "
                                   f"test images of {name} (nsd_ids {missing[:5]}{'...' if len(missing) > 5 else ''})")
    extra = len(set(by_id) - {int(i) for i in ids})
    return [by_id[int(i)] for i in ids], {"folder": str(folder), "ignored_files": ignored, "extra_ids": extra}


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


# Pillow modes of integer images deeper than 8 bits (16-bit grayscale PNGs open as "I" or "I;16*"): converting
# them with ``convert("RGB")`` clips every value above 255, i.e. almost every pixel, to white (a constant image)
WIDE_INTEGER_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")


def read_image(path: Path) -> np.ndarray:
    """An image file -> (H, W, 3) uint8: 8-bit modes as Pillow converts them, 16-bit integer images scaled to 8 bits
    (x / 257, rounded); a float image or an unreadable file is one line naming the file."""
    try:
        with Image.open(path) as pil:
            if pil.mode in WIDE_INTEGER_MODES:
                values = np.asarray(pil, dtype=np.int64)
                if values.size and (values.min() < 0 or values.max() > 65535):
                    raise EvaluationInputError(f"--recons: {path} has {pil.mode} pixel values outside 0..65535 "
                                               f"({values.min()}..{values.max()}): save it as an 8- or 16-bit image")
                gray = np.round(values / 257.0).astype(np.uint8)
                return np.repeat(gray[..., None], 3, axis=-1)
            if pil.mode == "F":
                raise EvaluationInputError(f"--recons: {path} is a floating-point ({pil.mode}) image: save it as an "
                                           "8- or 16-bit PNG")
            return np.array(pil.convert("RGB"))
    except EvaluationInputError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:  # corrupt/truncated/not an image
        raise EvaluationInputError(f"--recons: cannot read {path}: {exc}") from exc


class ImageSet:
    """N images in a fixed order, served as uint8 (H, W, 3) arrays: in memory when given as arrays or once read
    from disk at most ``MEMORY_SIDE`` px; larger files are decoded again on each access."""

    def __init__(self, images: list[np.ndarray] | None = None, paths: list[Path] | None = None):
        if (images is None) == (paths is None):
            raise ValueError("give images or paths")
        self.paths = paths
        self.cache: list[np.ndarray | None] = list(images) if images is not None else [None] * len(paths)

    def __len__(self) -> int:
        return len(self.cache)

    def get(self, index: int) -> np.ndarray:
        image = self.cache[index]
        if image is None:
            image = read_image(self.paths[index])
            if max(image.shape[:2]) <= MEMORY_SIDE:
                self.cache[index] = image
        return image

    def batch(self, start: int, stop: int) -> list[np.ndarray]:
        return [self.get(i) for i in range(start, stop)]


def load_embeddings(embeddings_dir: str | Path, subject: str | int, ids: np.ndarray, brain_key: str = "clip_mean",
                    image_key: str = "target", check_only: bool = False) -> tuple[np.ndarray, np.ndarray] | None:
    """(brain, image) embeddings of ``ids`` (rows in ``ids`` order) from a stage-1 ``predict`` ``<subject>.npz``
    (``check_only``: validate the file, its keys and ids without reading the embeddings)."""
    name = subject_name(subject)
    path = Path(embeddings_dir) / f"{name}.npz"
    if not path.is_file():
        raise EvaluationInputError(f"--embeddings: no {path} (the stage-1 predict output of {name})")
    with np.load(path) as data:
        for key in ("nsd_id", brain_key, image_key):
            if key not in data:
                raise EvaluationInputError(f"--embeddings: {path} has no array {key!r} (has {sorted(data.files)})")
        row = {int(i): r for r, i in enumerate(data["nsd_id"])}
        missing = [int(i) for i in ids if int(i) not in row]
        if missing:
            raise EvaluationInputError(f"--embeddings: {path} lacks {len(missing)} test images "
                                       f"(nsd_ids {missing[:5]}{'...' if len(missing) > 5 else ''})")
        if check_only:
            return None
        order = np.array([row[int(i)] for i in ids])
        return np.asarray(data[brain_key][order]), np.asarray(data[image_key][order])

