"""Validation split of whole images taken from the training sessions, materialised once as grouped shards.

The held-out images are chosen by seed among the unique training images of the selected sessions (never test
images); every trial of a chosen image leaves training. The chosen trials are regrouped into one sample per
image with all its repeats (the test-shard format), written once to a cache shard named by a hash of the choice.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from datamodules.build_once import build_once
from datamodules.common import DataFormatError
from datamodules.shard_format import (
    FORMAT_VERSION,
    IMAGE_KEYS,
    INFO_KEY,
    VOXEL_KEY,
    encode_npy,
    image_key,
    write_shard,
)
from datamodules.streams import raise_with_shard, stream_seed


def choose_val_ids(meta: Mapping[str, Any], sessions: Sequence[int], num_images: int, seed: int) -> list[int]:
    """Sorted nsd_id of ``num_images`` whole training images of ``sessions``, chosen by ``seed``."""
    ids = sorted({i for s in meta["sessions"] if s["session"] in sessions for i in s["nsd_ids"]})
    if num_images == 0:
        return []
    if num_images >= len(ids):
        raise DataFormatError(f"data.val_images={num_images} leaves no training images for {meta['subject']}: "
                              f"its {len(sessions)} selected sessions hold {len(ids)} unique images")
    rng = np.random.default_rng(stream_seed("val", seed, meta["subject"]))
    return sorted(int(i) for i in rng.choice(ids, size=num_images, replace=False))


def source_fingerprint(subject_root: Path, meta: Mapping[str, Any], sessions: Sequence[int]) -> list:
    """What a validation shard is built from: the voxel count and, per selected session shard, its name, size and
    modification time (a re-import rewrites the shards, so it changes this; a missing shard is named here)."""
    parts: list = [int(meta["num_voxels"])]
    for s in meta["sessions"]:
        if s["session"] in sessions:
            path = Path(subject_root) / s["shard"]
            try:
                stat = path.stat()
            except FileNotFoundError:
                raise DataFormatError(f"session shard {path} is missing (listed in "
                                      f"{Path(subject_root) / 'meta.json'})") from None
            parts.append([s["shard"], stat.st_size, stat.st_mtime_ns])
    return parts


def val_cache_path(cache_dir: Path, subject: str, sessions: Sequence[int], ids: Sequence[int],
                   fingerprint: Sequence[Any] = ()) -> Path:
    """The cache shard of one validation choice, named by a hash of the format version, sessions, ids and the
    ``fingerprint`` of the shards it is built from (``source_fingerprint``): re-imported data gets a new one."""
    key = [FORMAT_VERSION, list(sessions), list(ids), list(fingerprint)]
    digest = hashlib.sha1(json.dumps(key).encode()).hexdigest()[:12]
    return cache_dir / subject / f"val-{digest}.tar"


def build_val_shard(subject_root: Path, meta: Mapping[str, Any], sessions: Sequence[int], ids: Sequence[int],
                    path: Path) -> Path:
    """Regroup the trials of ``ids`` from the session shards into one grouped shard at ``path`` (atomic), unless it
    exists; of the nodes that share the cache directory exactly one writes it, the others wait (``build_once``)."""
    return build_once(path, lambda target: _write_val_shard(subject_root, meta, sessions, ids, target))


def _write_val_shard(subject_root: Path, meta: Mapping[str, Any], sessions: Sequence[int], ids: Sequence[int],
                     path: Path) -> None:
    wanted = set(ids)
    trials: dict[int, list[tuple[int, np.ndarray, dict]]] = {i: [] for i in ids}
    images: dict[int, tuple[str, bytes]] = {}
    urls = [{"url": str(subject_root / s["shard"])} for s in meta["sessions"] if s["session"] in sessions
            and wanted.intersection(s["nsd_ids"])]
    for raw in wds.tarfile_to_samples(handler=raise_with_shard)(urls):
        info = json.loads(raw[INFO_KEY])
        if info["nsd_id"] not in wanted:
            continue
        voxels = np.load(io.BytesIO(raw[VOXEL_KEY]), allow_pickle=False)
        if voxels.shape[-1:] != (int(meta["num_voxels"]),):
            raise DataFormatError(f"shard {raw.get('__url__')} (key {raw.get('__key__')}) has {voxels.shape[-1]} "
                                  f"voxels, {Path(subject_root) / 'meta.json'} says {meta['num_voxels']}")
        trials[info["nsd_id"]].append((info["global_trial"], voxels, info))
        ext = next(k for k in IMAGE_KEYS if k in raw)
        images.setdefault(info["nsd_id"], (ext, raw[ext]))

    def samples():
        for nsd_id in ids:
            reps = sorted(trials[nsd_id], key=lambda t: t[0])
            if not reps:
                raise DataFormatError(f"{meta['subject']}: validation image {nsd_id} not found in its shards")
            info = {"subject": meta["subject"], "nsd_id": nsd_id, "num_repeats": len(reps),
                    "sessions": [r[2]["session"] for r in reps], "trials": [r[2]["trial"] for r in reps],
                    "global_trials": [r[0] for r in reps], "captions": reps[0][2].get("captions", []),
                    "categories": reps[0][2].get("categories", [])}
            ext, payload = images[nsd_id]
            yield {"__key__": image_key(meta["subject"], nsd_id),
                   VOXEL_KEY: encode_npy(np.stack([r[1] for r in reps])), ext: payload,
                   INFO_KEY: json.dumps(info, sort_keys=True).encode()}

    write_shard(path, samples())
