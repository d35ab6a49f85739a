"""Stage 2's conditioning cache: a frozen stage-1 encoder's expert embeddings of every trial, computed once.

Written by ``python -m experiments.cache_conditions`` (``experiments.caching.conditions``), read by stage 2 through
``model.condition_cache`` (branch -> directory) in place of the branch's ``FrozenStage1``, so a stage-2 rank never
builds the stage-1 encoders nor runs their priors. One directory per branch::

    DIR/<subject>/part-<k>-of-<n>/        one per writer shard (DDP / Slurm task k of n)
        meta.json                         format_version, encoder (path, sha256, target), source, prior settings,
                                          repeat_average, frozen_dtype, num_experts, embed_dim, dtype, provenance
        {train,eval}_keys.npy  (N, 4) int64: nsd_id, session, trial (-1 for an evaluation image), crc32
        {train,eval}_values.npy (N, sum E, D): the experts of every level, concatenated, in the encoder's own
                                          dtype (``frozen_dtype``; bfloat16 as its raw 16 bits): exactly the live
                                          path's numbers, 2 bytes a value at paper scale

``train`` rows are single trials (training batches, (b, V)); ``eval`` rows are the validation and test images with
their repeats averaged as stage 2's evaluation batches ((b, R, V) with a repeat mask) average them. A row is found
by its ``nsd_id`` and the crc32 of the voxels it was computed from (the trial's float32 voxels, or the valid
repeats of an evaluation image), so a batch from other data (another import, other sessions, other repeats) is
refused instead of silently conditioned on the wrong trial.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from datamodules.common import DataFormatError
from datamodules.shard_format import subject_name
from lightning_modules.stage1_files import weights_sha256

CONDITION_FORMAT_VERSION = 1
SPLITS = ("train", "eval")
STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}  # dtype -> numpy storage
# what must agree between the cache and the stage-2 config that reads it (meta.json key -> module option)
SETTINGS = {"source": "image_branch/text_branch.source", "prior_steps": "model.prior_steps",
            "prior_guidance": "model.prior_guidance", "prior_seed": "model.prior_seed",
            "repeat_average": "model.repeat_average", "frozen_dtype": "model.frozen_dtype"}


def voxel_checksums(voxels: torch.Tensor, repeat_mask: torch.Tensor | None = None) -> np.ndarray:
    """(b, V) trials, or (b, R, V) with a (b, R) repeat mask -> (b,) crc32 of each row's float32 voxels (valid
    repeats only): the second half of a cache key."""
    x = voxels.detach().to("cpu", torch.float32).numpy()
    if x.ndim == 2:
        return np.array([zlib.crc32(np.ascontiguousarray(row).tobytes()) for row in x], dtype=np.int64)
    mask = (repeat_mask.detach().cpu().numpy().astype(bool) if repeat_mask is not None
            else np.ones(x.shape[:2], dtype=bool))
    return np.array([zlib.crc32(np.ascontiguousarray(row[m]).tobytes()) for row, m in zip(x, mask)],
                    dtype=np.int64)


def lookup_keys(nsd_ids: np.ndarray, crcs: np.ndarray) -> np.ndarray:
    """(N,) nsd_id and (N,) crc32 -> (N,) int64 keys ``nsd_id * 2**32 + crc``."""
    return np.asarray(nsd_ids, dtype=np.int64) * (1 << 32) + np.asarray(crcs, dtype=np.int64)


def read_meta(part: Path) -> dict[str, Any]:
    path = part / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataFormatError(f"condition cache {path} is unreadable ({exc}); recompute it "
                              "(python -m experiments.cache_conditions)") from None
    if meta.get("format_version") != CONDITION_FORMAT_VERSION:
        raise DataFormatError(f"{path}: format_version {meta.get('format_version')} is not "
                              f"{CONDITION_FORMAT_VERSION}; recompute the cache")
    return meta


class _SubjectTable:
    """One subject's parts: sorted keys per split -> (part, row), values memory-mapped."""

    def __init__(self, directory: Path, option: str):
        parts = sorted(p for p in directory.glob("part-*-of-*") if p.is_dir())
        if not parts:
            raise DataFormatError(f"{option}: {directory} holds no finished part (an interrupted "
                                  "cache_conditions run resumes when started again)")
        counts = {p.name.rpartition("-of-")[2] for p in parts}
        expected = {f"part-{k}-of-{n}" for n in counts for k in range(int(n))} if len(counts) == 1 else set()
        if {p.name for p in parts} != expected:
            raise DataFormatError(f"{option}: {directory} has parts {[p.name for p in parts]}, not all of one "
                                  "sharded run: finish the missing shards or recompute")
        self.metas = [read_meta(p) for p in parts]
        self.keys, self.where, self.values = {}, {}, {}
        for split in SPLITS:
            keys, where, values = [], [], []
            for i, part in enumerate(parts):
                k = np.load(part / f"{split}_keys.npy")
                v = np.load(part / f"{split}_values.npy", mmap_mode="r")
                if k.ndim != 2 or k.shape[1] != 4 or len(k) != len(v):
                    raise DataFormatError(f"{option}: {part} has {len(k)} {split} keys but {len(v)} values")
                keys.append(lookup_keys(k[:, 0], k[:, 3]))
                where.append(np.stack([np.full(len(k), i), np.arange(len(k))], 1))
                values.append(v)
            flat = np.concatenate(keys) if keys else np.zeros(0, np.int64)
            order = np.argsort(flat, kind="stable")
            self.keys[split], self.where[split], self.values[split] = flat[order], np.concatenate(where)[order], values

    def rows(self, split: str, keys: np.ndarray, option: str, subject: str) -> np.ndarray:
        """(b,) keys -> (b, sum E, D) stored rows; one line naming the option for a key the cache lacks."""
        table = self.keys[split]
        pos = np.minimum(np.searchsorted(table, keys), max(len(table) - 1, 0))
        found = (table[pos] == keys) if len(table) else np.zeros(len(keys), bool)
        if not found.all():
            missing = int(keys[~found][0] >> 32)
            raise DataFormatError(f"{option}: no {split} entry for {subject} nsd_id {missing} with these voxels "
                                  "(other data, sessions or repeats than the cache was computed from; recompute "
                                  "it with this run's data settings)")
        where = self.where[split][pos]
        out = np.empty((len(keys), *self.values[split][0].shape[1:]), dtype=self.values[split][0].dtype)
        for p, values in enumerate(self.values[split]):  # one gather per part file
            sel = where[:, 0] == p
            if sel.any():
                out[sel] = values[where[sel, 1]]
        return out


class CachedStage1(nn.Module):
    """A branch's expert embeddings read from a conditioning cache: the ``FrozenStage1`` interface without its
    weights (``embed(sub, subject)`` -> [(b, E_l, D)] per level; ``num_experts``, ``embed_dim``, ``num_voxels``).

    Args:
        directory: the branch's cache directory; option: the config key that named it (for errors).
        settings: the stage-2 config's values of ``SETTINGS`` for this branch (a cache computed otherwise is
            refused); checkpoint: the config's stage-1 checkpoint for this branch, if any (its sha256 must match).
    """

    def __init__(self, directory: str | Path, option: str, settings: dict[str, Any],
                 checkpoint: str | None = None):
        super().__init__()
        self.directory, self.option = Path(directory), option
        subjects = sorted(p for p in self.directory.iterdir() if p.is_dir()) if self.directory.is_dir() else []
        if not subjects:
            raise DataFormatError(f"{option}: no condition cache at {self.directory} (python -m "
                                    "experiments.cache_conditions writes one per branch)")
        self.tables = {p.name: _SubjectTable(p, option) for p in subjects}
        metas = [m for t in self.tables.values() for m in t.metas]
        first = metas[0]
        for meta in metas:
            for key in ("encoder", "num_experts", "embed_dim", *SETTINGS):
                if meta.get(key) != first.get(key):
                    raise DataFormatError(f"{option}: the parts under {self.directory} disagree on {key} "
                                          f"({meta.get(key)!r} vs {first.get(key)!r}); recompute the cache")
        for key, where in SETTINGS.items():
            if key.startswith("prior_") and first["source"] != "prior":
                continue  # experts read from the clip heads: the prior sampler plays no part
            if key in settings and settings[key] != first[key]:
                raise DataFormatError(f"{option}: {self.directory} was computed with {key}={first[key]!r}, but "
                                      f"this run has {where}={settings[key]!r}; recompute it or match the setting")
        if checkpoint and Path(checkpoint).exists():
            if weights_sha256(checkpoint) != first["encoder"]["sha256"]:
                raise DataFormatError(f"{option}: {self.directory} was computed from {first['encoder']['path']}, "
                                      f"not from this run's stage-1 checkpoint {checkpoint} (other weights)")
        self.meta, self.num_experts, self.embed_dim = first, list(first["num_experts"]), int(first["embed_dim"])
        self.num_voxels = {s: int(v) for m in metas for s, v in m["num_voxels"].items()}
        self.target = first["encoder"].get("target")
        self.register_buffer("_device_probe", torch.zeros(0), persistent=False)

    def check_subjects(self, subjects: list[str] | dict[str, int], option: str) -> None:
        unknown = [s for s in subjects if subject_name(s) not in self.tables]
        if unknown:
            raise DataFormatError(f"{self.option}: {self.directory} has no entries for {unknown} (it holds "
                             f"{sorted(self.tables)}); cache them first")
        for s, count in (subjects.items() if isinstance(subjects, dict) else []):
            if int(count) != self.num_voxels[subject_name(s)]:
                raise DataFormatError(f"{self.option}: {subject_name(s)} has {self.num_voxels[subject_name(s)]} voxels "
                                 f"in {self.directory} but {int(count)} in the data ({option})")

    def embed(self, sub: dict[str, Any], subject: str) -> list[torch.Tensor]:
        """A sub-batch (``voxels`` (b, V), or (b, R, V) with ``repeat_mask``; ``nsd_id`` (b,)) -> [(b, E_l, D)]."""
        name = subject_name(subject)
        if name not in self.tables:
            self.check_subjects([name], self.option)
        voxels = sub["voxels"]
        split = "train" if voxels.dim() == 2 else "eval"
        keys = lookup_keys(sub["nsd_id"].detach().cpu().numpy(), voxel_checksums(voxels, sub.get("repeat_mask")))
        rows = torch.from_numpy(self.tables[name].rows(split, keys, self.option, name))
        rows = rows.view(torch.bfloat16) if self.meta["dtype"] == "bfloat16" else rows
        return list(rows.to(self._device_probe.device).split(self.num_experts, 1))
