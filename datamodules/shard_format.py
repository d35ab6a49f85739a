"""Our self-contained WebDataset shard format (version 1): sample encoding, decoding and subject metadata.

Layout of a prepared dataset root (documented in ``datamodules/README.md``)::

    ROOT/subjXX/meta.json                 subject metadata (see ``SUBJECT_META_KEYS``)
    ROOT/subjXX/train/session-NN.tar      one shard per scan session: one sample per training trial
    ROOT/subjXX/test/test-NNNNNN.tar      one sample per unique test image, holding all its repeats
    ROOT/subjXX/norm_stats.npz            per-voxel mean/std when the importer re-normalised

Trial sample: ``voxels.npy`` float16 (V,), ``image.png`` (or ``.jpg``) uint8 RGB, ``json`` trial info.
Image sample: ``voxels.npy`` float16 (R, V) with R = number of repeats, ``image.png``, ``json`` image info.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from datamodules.common import DataFormatError, atomic_path

FORMAT_VERSION = 1
VOXEL_KEY = "voxels.npy"
INFO_KEY = "json"
IMAGE_KEYS = ("image.png", "image.jpg")
SUBJECT_META_KEYS = ("format_version", "subject", "num_voxels", "sessions", "test", "normalisation",
                     "image_size", "max_repeats", "provenance")


def subject_name(subject: int | str) -> str:
    """Canonical subject name: ``1``, ``"1"``, ``"subj1"``, ``"subj01"`` -> ``"subj01"``."""
    match = re.fullmatch(r"(?:subj)?0*(\d+)", str(subject).strip().lower())
    if match is None:
        raise DataFormatError(f"unknown subject {subject!r}: expected a number or a name like 'subj01'")
    return f"subj{int(match.group(1)):02d}"


def train_shard_name(session: int) -> str:
    return f"train/session-{session:02d}.tar"


def test_shard_name(index: int) -> str:
    return f"test/test-{index:06d}.tar"


def trial_key(subject: str, session: int, trial: int) -> str:
    return f"{subject}_s{session:02d}_t{trial:04d}"


def image_key(subject: str, nsd_id: int) -> str:
    return f"{subject}_n{nsd_id:06d}"


def encode_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def encode_image(image: np.ndarray, image_format: str = "png", quality: int = 95) -> bytes:
    """(H, W, 3) uint8 -> PNG (lossless) or JPEG bytes."""
    buffer = io.BytesIO()
    pil = Image.fromarray(image, mode="RGB")
    if image_format == "png":
        pil.save(buffer, format="PNG", compress_level=1)
    elif image_format == "jpg":
        pil.save(buffer, format="JPEG", quality=quality)
    else:
        raise DataFormatError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    return buffer.getvalue()


def encode_sample(key: str, voxels: np.ndarray, image: np.ndarray, info: Mapping[str, Any],
                  image_format: str = "png") -> dict[str, bytes]:
    """One sample as tar members: float16 voxels (V,) or (R, V), an RGB uint8 image, JSON info."""
    return {
        "__key__": key,
        VOXEL_KEY: encode_npy(np.ascontiguousarray(voxels, dtype=np.float16)),
        f"image.{image_format}": encode_image(image, image_format),
        INFO_KEY: json.dumps(dict(info), sort_keys=True).encode(),
    }


def write_shard(path: str | Path, samples: Iterable[Mapping[str, Any]]) -> int:
    """Write samples to a tar shard atomically (temp file, then rename); returns the sample count.

    Members get mtime 0 and fixed ownership so that equal inputs give byte-identical shards.
    """
    count = 0
    with atomic_path(path) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            key = sample["__key__"]
            for name, payload in sample.items():
                if name == "__key__":
                    continue
                member = tarfile.TarInfo(f"{key}.{name}")
                member.size = len(payload)
                member.mode = 0o444
                tar.addfile(member, io.BytesIO(payload))
            count += 1
    return count


def decode_image(payload: bytes) -> np.ndarray:
    """PNG/JPEG bytes -> (H, W, 3) uint8 (writable)."""
    with Image.open(io.BytesIO(payload)) as pil:
        return np.array(pil.convert("RGB"))


def decode_sample(raw: Mapping[str, Any], load_image: bool = True) -> dict[str, Any]:
    """Raw tar sample (bytes per member) -> ``{"voxels", "image", "info", "key", "url"}``.

    Raises ``DataFormatError`` naming the shard and key when a member is missing or voxels are not finite.
    """
    where = f"{raw.get('__url__', '?')} (key {raw.get('__key__', '?')})"
    if VOXEL_KEY not in raw or INFO_KEY not in raw:
        raise DataFormatError(f"sample {where} lacks {VOXEL_KEY!r} or {INFO_KEY!r}: not a format-v{FORMAT_VERSION} shard")
    voxels = np.load(io.BytesIO(raw[VOXEL_KEY]), allow_pickle=False)
    if not np.isfinite(voxels).all():
        raise DataFormatError(f"sample {where} has NaN or Inf voxels")
    image = None
    if load_image:
        payload = next((raw[k] for k in IMAGE_KEYS if k in raw), None)
        if payload is None:
            raise DataFormatError(f"sample {where} has no image member ({' or '.join(IMAGE_KEYS)})")
        image = decode_image(payload)
    return {"voxels": voxels, "image": image, "info": json.loads(raw[INFO_KEY]),
            "key": raw.get("__key__"), "url": raw.get("__url__")}


def read_tar_members(path: str | Path) -> dict[str, bytes]:
    """All members of a small tar as ``{name: bytes}``; a truncated or corrupt tar raises naming the file."""
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r") as tar:
            for member in tar:
                if member.isfile():
                    handle = tar.extractfile(member)
                    data = handle.read() if handle else b""
                    if len(data) != member.size:
                        raise tarfile.ReadError(f"member {member.name} truncated")
                    if member.name in members:  # a second copy would silently replace the first
                        raise DataFormatError(f"tar {path} holds member {member.name} twice")
                    members[member.name] = data
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataFormatError(f"cannot read tar {path}: {exc} (truncated or corrupt file?)") from exc
    return members


def subject_dir(root: str | Path, subject: str) -> Path:
    return Path(root) / subject


def load_subject_meta(root: str | Path, subject: int | str) -> dict[str, Any]:
    """Read and validate ``ROOT/subjXX/meta.json``; clear errors for unknown subjects and old formats."""
    name = subject_name(subject)
    path = subject_dir(root, name) / "meta.json"
    if not path.is_file():
        available = sorted(p.parent.name for p in Path(root).glob("subj*/meta.json"))
        raise DataFormatError(
            f"unknown subject {name}: no {path}. Subjects prepared under {root}: {available or 'none'} "
            "(prepare data with `python -m experiments.prepare_nsd` or `python -m experiments.make_synthetic_nsd`)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{path} is not valid JSON: {exc}") from exc
    missing = [k for k in SUBJECT_META_KEYS if k not in meta]
    if missing:
        raise DataFormatError(f"{path} lacks keys {missing}")
    if meta["format_version"] != FORMAT_VERSION:
        raise DataFormatError(f"{path} has format_version {meta['format_version']}, this code reads "
                              f"{FORMAT_VERSION}: re-run the importer into a new directory")
    return meta
