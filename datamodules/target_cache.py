"""Cached per-image targets and latents, joined to batches by ``nsd_id``.

A cache is a directory holding ``ids.npy`` (N,) sorted unique int64 ``nsd_id``, ``values.npy`` (N, ...) and
``meta.json`` (``format_version``, producing ``model`` and its weights' ``model_sha256``, ``layer``, per-item
``shape``, ``dtype``, provenance).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.common import DataFormatError, provenance

TARGET_FORMAT_VERSION = 1
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def model_fingerprint(model: str | Path, suffixes: tuple[str, ...] = WEIGHT_SUFFIXES) -> str | None:
    """sha256 over a file, or over the files of a directory whose names end in ``suffixes`` (default: the weight
    files), in path order; None when there are none (a name, not local weights). A cache records it, so one
    computed with other weights at the same path is recognised as stale."""
    root = Path(model)
    if root.is_file():
        files = {root.name: root}
    elif root.is_dir():
        files = {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.suffix in suffixes and p.is_file()}
    else:
        files = {}
    if not files:
        return None
    digest = hashlib.sha256()
    for name, path in files.items():
        digest.update(name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def write_target_cache(directory: str | Path, ids: np.ndarray, values: np.ndarray, *, model: str, layer: str,
                       extra: Mapping[str, Any] | None = None) -> Path:
    """Write a cache atomically (a temporary directory renamed into place). ``ids`` need not be sorted."""
    directory = Path(directory)
    ids = np.asarray(ids, dtype=np.int64)
    values = np.asarray(values)
    if len(ids) != len(values):
        raise DataFormatError(f"target cache {directory}: {len(ids)} ids but {len(values)} values")
    if len(np.unique(ids)) != len(ids):
        raise DataFormatError(f"target cache {directory}: duplicate nsd_id values")
    order = np.argsort(ids)
    tmp = directory.with_name(f".{directory.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        np.save(tmp / "ids.npy", ids[order])
        np.save(tmp / "values.npy", values[order])
        meta = {"format_version": TARGET_FORMAT_VERSION, "model": model, "model_sha256": model_fingerprint(model),
                "layer": layer,
                "shape": list(values.shape[1:]), "dtype": str(values.dtype), "count": len(ids),
                "provenance": provenance(**(extra or {}))}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


class TargetCache:
    """Read side of a target cache; values are memory-mapped lazily (safe to pickle into loader workers)."""

    def __init__(self, directory: str | Path, expected_shape: Sequence[int] | None = None):
        self.directory = Path(directory)
        meta_path = self.directory / "meta.json"
        if not meta_path.is_file():
            raise DataFormatError(f"target cache {self.directory} has no meta.json (compute it first, e.g. "
                                  "`python -m experiments.cache_targets`, or fix the data.targets path)")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format_version") != TARGET_FORMAT_VERSION:
            raise DataFormatError(f"{meta_path}: format_version {self.meta.get('format_version')} is not "
                                  f"{TARGET_FORMAT_VERSION}; recompute the cache")
        self.shape = tuple(self.meta["shape"])
        if expected_shape is not None and tuple(expected_shape) != self.shape:
            raise DataFormatError(f"target cache {self.directory} holds items of shape {list(self.shape)} but "
                                  f"{list(expected_shape)} is expected (data.target_shapes); recompute the cache "
                                  "with the model the config names")
        self.ids = np.load(self.directory / "ids.npy")
        if self.ids.dtype != np.int64 or (np.diff(self.ids) <= 0).any():
            raise DataFormatError(f"{self.directory / 'ids.npy'} must be sorted unique int64 nsd_id values")
        values = np.load(self.directory / "values.npy", mmap_mode="r")
        if tuple(values.shape) != (len(self.ids), *self.shape):
            raise DataFormatError(f"{self.directory / 'values.npy'} has shape {list(values.shape)}, meta.json "
                                  f"says {[len(self.ids), *self.shape]}")
        self._values: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_values"] = None
        return state

    def lookup(self, nsd_ids: np.ndarray) -> np.ndarray:
        """(b,) nsd_id -> (b, *shape) values; an id missing from the cache raises naming it."""
        if self._values is None:
            self._values = np.load(self.directory / "values.npy", mmap_mode="r")
        nsd_ids = np.asarray(nsd_ids, dtype=np.int64)
        pos = np.searchsorted(self.ids, nsd_ids).clip(0, max(len(self.ids) - 1, 0))
        missing = nsd_ids[(len(self.ids) == 0) | (self.ids[pos] != nsd_ids)] if len(nsd_ids) else nsd_ids
        if len(missing):
            raise DataFormatError(f"target cache {self.directory} has no entry for nsd_id {int(missing[0])}")
        return np.asarray(self._values[pos])
