"""Write one subject in our shard format from any trial source (MindEyeV2 release, synthetic generator).

Bounded memory: voxels and images are read in sorted row chunks. Atomic and resumable: every shard is written
to a temporary file and renamed; finished shards are skipped on a re-run, temporaries of an interrupted run are
removed and redone, and ``meta.json`` (written last) marks the subject complete.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image
from tqdm import tqdm

from datamodules.common import (
    DataFormatError,
    atomic_path,
    output_lock,
    provenance,
    remove_stale_temporaries,
    write_json_atomic,
)
from datamodules.shard_format import (
    FORMAT_VERSION,
    encode_sample,
    image_key,
    test_shard_name,
    train_shard_name,
    trial_key,
    write_shard,
)

STATE_FILE = ".import_state.json"
LOCK_FILE = ".import.lock"


@dataclass
class TrialTable:
    """One row per trial, all arrays (N,): 0-based 73k ``nsd_id``, 1-based ``session``/``run``, 0-based ``trial``
    within its session, ``global_trial`` (row of the subject's betas matrix), ``is_test`` (shared image)."""

    nsd_id: np.ndarray
    session: np.ndarray
    run: np.ndarray
    trial: np.ndarray
    global_trial: np.ndarray
    is_test: np.ndarray

    def select(self, mask: np.ndarray) -> TrialTable:
        return TrialTable(*(getattr(self, f)[mask] for f in self.__dataclass_fields__))

    def __len__(self) -> int:
        return len(self.nsd_id)


class SubjectSource(Protocol):
    """What a data source provides for one subject."""

    num_voxels: int
    image_size: int

    def read_voxels(self, rows: np.ndarray) -> np.ndarray:
        """Sorted unique betas rows (n,) -> float32 (n, V); raises ``DataFormatError`` on NaN/Inf."""

    def read_images(self, nsd_ids: np.ndarray) -> np.ndarray:
        """Sorted unique 73k ids (n,) -> uint8 (n, H, W, 3)."""


@dataclass
class WriteOptions:
    """Options that define the output; a resumed run must use the same ones."""

    sessions: list[int]
    image_size: int
    image_format: str = "png"
    test_shard_size: int = 250
    chunk_rows: int = 256
    normalisation: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    # the captions and categories files the samples' info was written from (path, SHA-256, images annotated):
    # a re-run with other ones rewrites the subject instead of keeping the old annotations
    captions: dict[str, Any] | None = None
    categories: dict[str, Any] | None = None


# options whose change only alters the samples' annotations: a re-run with other ones rewrites the subject
REWRITTEN_ON_CHANGE = ("captions", "categories")


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[1] == size:
        return images
    if images.shape[1] < size:
        raise DataFormatError(f"--image-size {size} exceeds the source image size {images.shape[1]}")
    return np.stack([np.array(Image.fromarray(im).resize((size, size), Image.Resampling.BICUBIC)) for im in images])


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _image_lookup(source: SubjectSource, ids: np.ndarray, size: int) -> dict[int, np.ndarray]:
    unique = np.unique(ids)
    return dict(zip(unique.tolist(), _resize(source.read_images(unique), size)))


def _normalise(voxels: np.ndarray, stats: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    if stats is None:
        return voxels
    mean, std = stats
    return (voxels - mean) / std


def compute_train_stats(source: SubjectSource, rows: np.ndarray, chunk_rows: int = 1024,
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Per-voxel mean and std (float32, (V,)) over the given betas rows, streamed in float64."""
    rows = np.unique(rows)
    total = np.zeros(source.num_voxels)
    total_sq = np.zeros(source.num_voxels)
    for part in _chunks(len(rows), chunk_rows):
        block = source.read_voxels(rows[part]).astype(np.float64)
        total += block.sum(0)
        total_sq += np.square(block).sum(0)
    mean = total / len(rows)
    std = np.sqrt(np.maximum(total_sq / len(rows) - mean**2, 0.0))
    std[std == 0] = 1.0
    return mean.astype(np.float32), std.astype(np.float32)


def _trial_samples(source, trials: TrialTable, subject, options, stats, captions, categories) -> Iterator[dict]:
    for part in _chunks(len(trials), options.chunk_rows):
        chunk = trials.select(np.arange(len(trials))[part])
        order = np.argsort(chunk.global_trial, kind="stable")
        voxels = np.empty((len(chunk), source.num_voxels), np.float32)
        voxels[order] = source.read_voxels(chunk.global_trial[order])
        voxels = _normalise(voxels, stats)
        images = _image_lookup(source, chunk.nsd_id, options.image_size)
        for i in range(len(chunk)):
            nsd_id = int(chunk.nsd_id[i])
            info = {"subject": subject, "nsd_id": nsd_id, "session": int(chunk.session[i]),
                    "run": int(chunk.run[i]), "trial": int(chunk.trial[i]),
                    "global_trial": int(chunk.global_trial[i]),
                    "captions": list(captions.get(nsd_id, [])), "categories": list(categories.get(nsd_id, []))}
            yield encode_sample(trial_key(subject, info["session"], info["trial"]), voxels[i], images[nsd_id],
                                info, options.image_format)


def _image_samples(source, trials: TrialTable, ids: Sequence[int], subject, options, stats, captions,
                   categories) -> Iterator[dict]:
    """One sample per image id (ascending), holding all its repeats in chronological order: (R, V)."""
    mask = np.isin(trials.nsd_id, ids)
    rows = np.unique(trials.global_trial[mask])
    voxels = _normalise(source.read_voxels(rows), stats)
    row_index = {int(r): i for i, r in enumerate(rows)}
    images = _image_lookup(source, np.asarray(ids), options.image_size)
    for nsd_id in ids:
        sel = np.flatnonzero(trials.nsd_id == nsd_id)
        sel = sel[np.argsort(trials.global_trial[sel], kind="stable")]
        info = {"subject": subject, "nsd_id": int(nsd_id), "num_repeats": len(sel),
                "sessions": trials.session[sel].tolist(), "trials": trials.trial[sel].tolist(),
                "global_trials": trials.global_trial[sel].tolist(),
                "captions": list(captions.get(int(nsd_id), [])),
                "categories": list(categories.get(int(nsd_id), []))}
        reps = voxels[[row_index[int(r)] for r in trials.global_trial[sel]]]
        yield encode_sample(image_key(subject, int(nsd_id)), reps, images[int(nsd_id)], info, options.image_format)


def _check_resume(out: Path, options: WriteOptions) -> bool:
    """True when the subject is already complete; raises when ``out`` holds output of other options."""
    state_path = out / STATE_FILE
    wanted = json.loads(json.dumps(options.__dict__))
    if state_path.exists():
        try:
            previous = json.loads(state_path.read_text())
        except json.JSONDecodeError as exc:
            raise DataFormatError(f"{state_path} is not valid JSON: {exc}; delete {out} and re-run") from exc
        legacy = [k for k in REWRITTEN_ON_CHANGE if k not in previous and wanted.get(k) is not None]
        if legacy and (out / "meta.json").exists():  # complete, from before annotations were recorded: keep it
            warnings.warn(f"{out} was imported before its {' and '.join(legacy)} were recorded: kept as it is "
                          "(delete that directory to re-import with these)", stacklevel=2)
            previous.update({k: wanted[k] for k in legacy})
        # other keys a state of an older version lacks count as None (the default of an option added since)
        changed = sorted(k for k in set(wanted) | set(previous) if previous.get(k) != wanted.get(k))
        if set(changed) - set(REWRITTEN_ON_CHANGE):
            raise DataFormatError(f"{out} holds output written with other options (differs in {changed}); "
                                  "choose a new --out or delete that directory")
        if changed:  # other captions/categories: every sample's info changes, so every shard is rewritten
            warnings.warn(f"{out}: {' and '.join(changed)} differ from the previous import: rewriting the subject", stacklevel=2)
            for path in [out / "meta.json", *sorted(out.glob("train/*.tar")), *sorted(out.glob("test/*.tar"))]:
                path.unlink(missing_ok=True)
            write_json_atomic(state_path, wanted)
            return False
        return (out / "meta.json").exists()
    if (out / "meta.json").exists():
        raise DataFormatError(f"{out} already holds a prepared subject with no import state; "
                              "choose a new --out or delete that directory")
    write_json_atomic(state_path, wanted)
    return False


def write_subject(source: SubjectSource, trials: TrialTable, out_root: str | Path, subject: str,
                  options: WriteOptions, *, stats: tuple[np.ndarray, np.ndarray] | None = None,
                  captions: Mapping[int, list[str]] | None = None,
                  categories: Mapping[int, list[str]] | None = None,
                  extra_meta: Mapping[str, Any] | None = None,
                  extra_files: Mapping[str, Callable[[Path], None]] | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Write ``subject``'s training sessions and test images below ``out_root``; returns its ``meta.json`` dict.

    ``trials`` holds every trial of the subject; training shards are written for ``options.sessions`` only
    (non-test trials), test shards for all test trials. ``extra_files`` maps a file name to a writer called
    with a temporary path (renamed into the subject directory atomically).
    """
    captions, categories = captions or {}, categories or {}
    out = Path(out_root) / subject
    out.mkdir(parents=True, exist_ok=True)
    # one writer per subject directory: a second run into it is refused (it would delete this one's temporaries)
    with output_lock(out, "import", LOCK_FILE):
        return _write_subject_locked(source, trials, out, subject, options, stats, captions, categories,
                                     extra_meta, extra_files, progress)


def _write_subject_locked(source, trials, out, subject, options, stats, captions, categories, extra_meta,
                          extra_files, progress) -> dict[str, Any]:
    remove_stale_temporaries(out)
    if _check_resume(out, options):
        return json.loads((out / "meta.json").read_text())

    for name, writer in (extra_files or {}).items():
        if not (out / name).exists():
            with atomic_path(out / name) as tmp:
                writer(tmp)
    if stats is not None and not (out / "norm_stats.npz").exists():
        with atomic_path(out / "norm_stats.npz") as tmp, open(tmp, "wb") as handle:
            np.savez(handle, mean=stats[0], std=stats[1])

    train = trials.select(~trials.is_test & np.isin(trials.session, options.sessions))
    test = trials.select(trials.is_test)
    test_ids = np.unique(test.nsd_id).tolist()
    test_groups = [test_ids[s] for s in _chunks(len(test_ids), options.test_shard_size)]
    bar = tqdm(total=len(train) + len(test_ids), desc=f"{subject}", unit="sample", disable=not progress)

    sessions_meta = []
    for session in options.sessions:
        part = train.select(train.session == session)
        part = part.select(np.argsort(part.global_trial, kind="stable"))
        shard = train_shard_name(session)
        if not (out / shard).exists():
            write_shard(out / shard, _trial_samples(source, part, subject, options, stats, captions, categories))
        bar.update(len(part))
        sessions_meta.append({"session": int(session), "shard": shard, "num_trials": len(part),
                              "nsd_ids": part.nsd_id.tolist()})
    test_meta = []
    for index, ids in enumerate(test_groups):
        shard = test_shard_name(index)
        if not (out / shard).exists():
            write_shard(out / shard, _image_samples(source, test, ids, subject, options, stats, captions,
                                                    categories))
        bar.update(len(ids))
        test_meta.append({"shard": shard, "nsd_ids": [int(i) for i in ids]})
    bar.close()

    repeats = np.unique(test.nsd_id, return_counts=True)[1] if len(test) else np.zeros(0, int)
    meta = {
        "format_version": FORMAT_VERSION,
        "subject": subject,
        "num_voxels": int(source.num_voxels),
        "voxel_dtype": "float16",
        "image_size": int(options.image_size),
        "image_format": options.image_format,
        "max_repeats": int(max(3, repeats.max(initial=0))),
        "sessions": sessions_meta,
        "test": {"shards": test_meta, "num_images": len(test_ids), "num_trials": len(test),
                 "repeat_histogram": {str(r): int((repeats == r).sum()) for r in np.unique(repeats)}},
        "normalisation": options.normalisation,
        "roi_mask": None,
        "voxel_roi": None,
        "provenance": provenance(source=options.source, subject=subject, sessions=list(options.sessions),
                                 format_version=FORMAT_VERSION),
    }
    meta.update(extra_meta or {})
    write_json_atomic(out / "meta.json", meta)
    return meta


def summarise(meta: Mapping[str, Any]) -> dict[str, int]:
    """Counts of one prepared subject: voxels, sessions, train trials/images, test images/trials."""
    train_ids = [i for s in meta["sessions"] for i in s["nsd_ids"]]
    return {"voxels": meta["num_voxels"], "sessions": len(meta["sessions"]), "train_trials": len(train_ids),
            "train_images": len(set(train_ids)), "test_images": meta["test"]["num_images"],
            "test_trials": meta["test"]["num_trials"]}
