"""Import the MindEyeV2 release layout into our shard format (``python -m experiments.prepare_nsd``).

Source layout (``reference-nsd-eval.md`` section 1): ``betas_all_subjXX_fp32_renorm.hdf5`` (dataset ``betas``,
rows = global trial), ``wds/subjXX/train/{k}.tar`` and ``wds/subjXX/new_test/0.tar`` holding ``behav.npy``
(1, 17) per trial (column 0 = 0-based 73k image id, 2 = session, 3 = run, 4 = trial in run, 5 = betas row),
``coco_images_224_float16.hdf5`` (dataset ``images``, (73000, 3, 224, 224) float16 in [0, 1]) and, when present,
``coco_captions.json`` (``{"<nsd_id>": [captions]}``).

Every problem (missing file or dataset, voxel count mismatch, index out of range, NaN/Inf, truncated tar) raises
``DataFormatError`` naming the file and key.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.common import DataFormatError
from datamodules.shard_format import read_tar_members, subject_name
from datamodules.subject_writer import TrialTable, WriteOptions, compute_train_stats, summarise, write_subject

# nsdgeneral voxel counts (func1pt8mm) of the NSD subjects, reference-nsd-eval.md section 1.1.
NSD_VOXELS = {"subj01": 15724, "subj02": 14278, "subj03": 15226, "subj04": 13153,
              "subj05": 13039, "subj06": 17907, "subj07": 12682, "subj08": 14386}
SYNTHETIC_LAYOUT = "synthetic_layout.json"
RELEASE_NORMALISATION = {
    "kind": "mindeye2_release",
    "stats": None,
    "description": "kept as released by MindEyeV2 (betas_all_subjXX_fp32_renorm.hdf5): per-voxel z-score with "
                   "statistics of the training trials of all sessions, so runs with fewer sessions see "
                   "40-session statistics (MindEye2 appendix A.2)",
}


# behav.npy columns that are integers (an id or index read as a float must not be truncated to another one)
INTEGER_COLUMNS = {0: "73k image id", 2: "session", 3: "run", 4: "trial in run", 5: "betas row"}


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise DataFormatError(f"missing {what}: {path}")
    return path


def _open_dataset(path: Path, key: str):
    import h5py

    try:
        handle = h5py.File(_require(path, "file"), "r")
    except OSError as exc:
        raise DataFormatError(f"cannot open HDF5 file {path}: {exc}") from exc
    if key not in handle:
        handle.close()
        raise DataFormatError(f"{path} has no dataset {key!r} (found {sorted(handle.keys()) if handle else []})")
    return handle, handle[key]


def read_behav(tar_path: Path) -> np.ndarray:
    """All ``behav.npy`` rows of a MindEyeV2 shard, (n, 17) float64 in key order."""
    members = read_tar_members(_require(tar_path, "MindEyeV2 shard"))
    keys = sorted({name.split(".", 1)[0] for name in members})
    if not keys:
        raise DataFormatError(f"{tar_path} holds no behav.npy entries")
    rows = []
    for key in keys:
        if f"{key}.behav.npy" not in members:  # a trial without its behaviour row would be dropped unseen
            found = sorted(n for n in members if n.split(".", 1)[0] == key)
            raise DataFormatError(f"{tar_path} sample {key} has no member {key}.behav.npy (has {found})")
        try:
            array = np.load(io.BytesIO(members[f"{key}.behav.npy"]), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise DataFormatError(f"{tar_path} member {key}.behav.npy is not a .npy array: {exc}") from exc
        if array.size != 17:
            raise DataFormatError(f"{tar_path} key {key} behav.npy has shape {array.shape}, expected (1, 17)")
        rows.append(array.reshape(17))
    behav = np.stack(rows).astype(np.float64)
    for column, what in INTEGER_COLUMNS.items():
        values = behav[:, column]
        bad = np.isfinite(values) & (values != np.round(values))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataFormatError(f"{tar_path} member {keys[i]}.behav.npy: column {column} ({what}) is "
                                  f"{values[i]!r}, not an integer")
    return behav


class MindEyeV2Source:
    """``SubjectSource`` over one subject of a MindEyeV2 release directory."""

    def __init__(self, root: str | Path, subject: str, num_sessions: int | None = None):
        self.root, self.subject = Path(root), subject
        self.betas_path = self.root / f"betas_all_{subject}_fp32_renorm.hdf5"
        self.images_path = self.root / "coco_images_224_float16.hdf5"
        self._betas_file, self._betas = _open_dataset(self.betas_path, "betas")
        self._images_file, self._images = _open_dataset(self.images_path, "images")
        self.num_voxels = int(self._betas.shape[1])
        self.image_size = int(self._images.shape[-1])
        if self._images.ndim != 4 or self._images.shape[1] != 3:
            raise DataFormatError(f"{self.images_path} key 'images' has shape {self._images.shape}, "
                                  "expected (N, 3, H, W)")
        train_dir = self.root / "wds" / subject / "train"
        available = len(list(train_dir.glob("*.tar")))
        if available == 0:
            raise DataFormatError(f"missing MindEyeV2 training shards: no {train_dir}/*.tar")
        if num_sessions is not None and num_sessions < 1:  # 0 would mean "all", -1 a subject with no data
            raise DataFormatError(f"--sessions {num_sessions}: give a number of sessions >= 1 (omit it for all "
                                  f"{available} sessions in {train_dir})")
        if num_sessions is not None and num_sessions > available:
            raise DataFormatError(f"--sessions {num_sessions} exceeds the {available} sessions in {train_dir}")
        self.num_sessions = num_sessions or available
        self.shard_paths = [train_dir / f"{k}.tar" for k in range(self.num_sessions)]
        self.unimported_paths = [train_dir / f"{k}.tar" for k in range(self.num_sessions, available)]
        self.test_path = self.root / "wds" / subject / "new_test" / "0.tar"
        self.trials = self._trial_table()

    def close(self) -> None:
        self._betas_file.close()
        self._images_file.close()

    def _trial_table(self) -> TrialTable:
        parts, test_flags, sources = [], [], []
        for path in [*self.shard_paths, self.test_path]:
            behav = read_behav(path)
            self._check_indices(behav, path)
            parts.append(behav)
            test_flags.append(np.full(len(behav), path == self.test_path))
            sources.append(path)
        # the sessions left out by --sessions still place the test trials of those sessions within them
        context = [read_behav(path) for path in self.unimported_paths]
        for path, rows in zip(self.unimported_paths, context):
            self._check_indices(rows, path)
        kept = sum(len(b) for b in parts)
        behav, is_test = np.concatenate(parts + context), np.concatenate(test_flags)
        rows = behav[:, 5].astype(np.int64)
        unique, counts = np.unique(rows, return_counts=True)
        if (counts > 1).any():
            raise DataFormatError(f"betas row {int(unique[counts > 1][0])} (behav column 5) appears in more than "
                                  f"one trial of {self.root / 'wds' / self.subject}")
        session = behav[:, 2].astype(np.int64)
        trial = np.empty_like(rows)  # 0-based position within its session, from the chronological betas row
        for s in np.unique(session):
            sel = np.flatnonzero(session == s)
            trial[sel[np.argsort(rows[sel])]] = np.arange(len(sel))
        return TrialTable(nsd_id=behav[:kept, 0].astype(np.int64), session=session[:kept],
                          run=behav[:kept, 3].astype(np.int64), trial=trial[:kept], global_trial=rows[:kept],
                          is_test=is_test)

    def _check_indices(self, behav: np.ndarray, path: Path) -> None:
        ids, rows = behav[:, 0], behav[:, 5]
        if not np.isfinite(behav[:, [0, 2, 5]]).all():
            raise DataFormatError(f"{path}: behav.npy columns 0/2/5 contain NaN or Inf")
        bad = (ids < 0) | (ids >= self._images.shape[0])
        if bad.any():
            raise DataFormatError(f"{path}: behav.npy column 0 (73k image id) value {int(ids[bad][0])} is out of "
                                  f"range for {self.images_path} key 'images' with {self._images.shape[0]} rows")
        bad = (rows < 0) | (rows >= self._betas.shape[0])
        if bad.any():
            raise DataFormatError(f"{path}: behav.npy column 5 (betas row) value {int(rows[bad][0])} is out of "
                                  f"range for {self.betas_path} key 'betas' with {self._betas.shape[0]} rows")

    def read_voxels(self, rows: np.ndarray) -> np.ndarray:
        block = np.asarray(self._betas[np.asarray(rows)], dtype=np.float32)
        if not np.isfinite(block).all():
            bad = int(np.asarray(rows)[~np.isfinite(block).all(1)][0])
            raise DataFormatError(f"{self.betas_path} key 'betas' row {bad} contains NaN or Inf")
        return block

    def read_images(self, nsd_ids: np.ndarray) -> np.ndarray:
        block = np.asarray(self._images[np.asarray(nsd_ids)], dtype=np.float32)
        if not np.isfinite(block).all():
            bad = int(np.asarray(nsd_ids)[~np.isfinite(block).reshape(len(block), -1).all(1)][0])
            raise DataFormatError(f"{self.images_path} key 'images' row {bad} contains NaN or Inf")
        return np.clip(np.round(block.transpose(0, 2, 3, 1) * 255.0), 0, 255).astype(np.uint8)


def expected_voxels(root: Path, subject: str, roi_mask: Path | None) -> tuple[int | None, str]:
    """The voxel count the betas must have, and where it comes from (ROI mask, synthetic layout, NSD table)."""
    if roi_mask is not None:
        import nibabel as nib

        volume = np.asarray(nib.load(str(_require(roi_mask, "ROI mask"))).dataobj)
        return int((volume == 1).sum()), str(roi_mask)
    layout = root / SYNTHETIC_LAYOUT
    if layout.exists():
        counts = json.loads(layout.read_text()).get("voxels", {})
        return counts.get(subject), str(layout)
    return NSD_VOXELS.get(subject), "the NSD nsdgeneral voxel table"


class NoCaptionsWarning(UserWarning):
    """The import writes no captions (``captions: []`` in every sample): text targets cannot be cached from it."""


def _load_json_map(path: Path | None, what: str) -> dict[int, list[str]]:
    if path is None or not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataFormatError(f"{what} file {path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise DataFormatError(f"{what} file {path} must map nsd_id to a list of strings, got {type(raw).__name__}")
    try:
        return {int(k): [v] if isinstance(v, str) else [str(x) for x in v] for k, v in raw.items()}
    except (TypeError, ValueError) as exc:
        raise DataFormatError(f"{what} file {path} must map integer nsd_id keys to lists of strings: {exc}") from exc


def annotation_record(path: Path | None, entries: Mapping[int, list[str]]) -> dict[str, Any] | None:
    """What the resume state records of a captions or categories file: its path, a SHA-256 of its bytes and how
    many images it annotates (None without one), so that a re-run with other annotations rewrites the output."""
    if path is None or not path.exists():
        return None
    return {"file": str(path.resolve()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "images": sum(1 for v in entries.values() if v)}


def load_captions(root: Path, captions: str | Path | None) -> tuple[dict[int, list[str]], Path | None]:
    """The captions map and its file: ``--captions`` must exist; the default ``ROOT/coco_captions.json`` may be
    absent, but an import without any captions warns loudly (a text target would embed "" for every image)."""
    if captions is not None:
        path = _require(Path(captions), "--captions file")
    else:
        path = root / "coco_captions.json"
    caption_map = _load_json_map(path, "--captions" if captions is not None else "captions")
    if not any(caption_map.values()):
        where = f"--captions {path} holds none" if captions is not None else (
            f"{path} is empty" if path.exists() else f"no {path}")
        warnings.warn(f"importing without captions ({where}): every sample gets captions: [] and text targets "
                      "(experiments.cache_targets --text-model) will refuse this data; pass --captions FILE",
                      NoCaptionsWarning, stacklevel=3)
        return caption_map, path if path.exists() else None
    return caption_map, path


def import_mindeye2(mindeye2_root: str | Path, out: str | Path, subjects: Sequence[int | str], *,
                    sessions: int | None = None, image_size: int | None = None, image_format: str = "png",
                    coco_categories: str | Path | None = None, captions: str | Path | None = None,
                    renormalise: bool = False, roi_mask_pattern: str | None = None,
                    check_voxel_count: bool = True, test_shard_size: int = 250, chunk_rows: int = 256,
                    progress: bool = True) -> dict[str, dict[str, Any]]:
    """Convert subjects of a MindEyeV2 release into our shard format; returns per-subject summary counts.

    ``roi_mask_pattern`` is a path with ``{subject}`` (e.g. ``/nsd/{subject}/func1pt8mm/roi/nsdgeneral.nii.gz``);
    its voxel count is checked against the betas and the mask is copied beside the shards for NIfTI output.
    """
    root = Path(mindeye2_root)
    _require(root, "MindEyeV2 root directory")
    caption_map, caption_path = load_captions(root, captions)
    category_path = _require(Path(coco_categories), "--coco-categories file") if coco_categories else None
    category_map = _load_json_map(category_path, "--coco-categories")
    annotations = {"captions": annotation_record(caption_path, caption_map),
                   "categories": annotation_record(category_path, category_map)}
    summary = {}
    for subj in subjects:
        name = subject_name(subj)
        source = MindEyeV2Source(root, name, sessions)
        try:
            mask = Path(roi_mask_pattern.format(subject=name)) if roi_mask_pattern else None
            expected, origin = expected_voxels(root, name, mask)
            if check_voxel_count and expected is not None and expected != source.num_voxels:
                raise DataFormatError(f"voxel count mismatch: {source.betas_path} key 'betas' has "
                                      f"{source.num_voxels} columns, {origin} says {expected} for {name} "
                                      "(for data other than NSD's nsdgeneral ROI pass --no-voxel-check)")
            trials = source.trials
            stats, normalisation = None, RELEASE_NORMALISATION
            if renormalise:
                train_rows = trials.global_trial[~trials.is_test & (trials.session <= source.num_sessions)]
                stats = compute_train_stats(source, train_rows, chunk_rows=max(chunk_rows, 512))
                normalisation = {"kind": "zscore_train", "stats": "norm_stats.npz",
                                 "description": f"re-normalised on import: per-voxel z-score with mean/std of the "
                                                f"training trials of the {source.num_sessions} imported sessions "
                                                "only, applied to every trial"}
            train_sessions = np.unique(trials.session[~trials.is_test])
            options = WriteOptions(
                sessions=[int(s) for s in train_sessions if s <= source.num_sessions],
                image_size=image_size or source.image_size, image_format=image_format,
                test_shard_size=test_shard_size, chunk_rows=chunk_rows, normalisation=normalisation,
                source=f"mindeye2:{root.resolve()}", **annotations)
            extra_files = {"nsdgeneral.nii.gz": lambda p, m=mask: p.write_bytes(m.read_bytes())} if mask else {}
            extra_meta = {"roi_mask": "nsdgeneral.nii.gz" if mask else None}
            meta = write_subject(source, trials, out, name, options, stats=stats, captions=caption_map,
                                 categories=category_map, extra_meta=extra_meta, extra_files=extra_files,
                                 progress=progress)
        finally:
            source.close()
        summary[name] = summarise(meta)
    return summary
