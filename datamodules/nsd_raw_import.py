"""Import subjects from NSD's own raw release into our shard format
(``python -m experiments.prepare_nsd --nsd-root DIR ...``). The recipe is documented in the README
("Raw NSD"); names follow NSD's data manual.

Files read, per subject ``subjXX`` (sessions ``NN`` from 01):

- betas ``nsddata_betas/ppdata/subjXX/func1pt8mm/<glm>/betas_sessionNN.nii.gz`` (or ``.hdf5``, dataset
  ``betas``), int16 percent signal change x 300, (X, Y, Z, T) with T trials of the session (750 in NSD; never
  assumed, checked against the design);
- mask ``nsddata/ppdata/subjXX/func1pt8mm/roi/nsdgeneral.nii.gz`` or any mask file (voxels with value > 0), in C
  order of the (X, Y, Z) volume (the order of MindEyeV2's release);
- optional ``<glm>/ncsnr.nii.gz`` for ``ncsnr_threshold``;
- design ``nsddata/experiments/nsd/nsd_expdesign.mat``: trial ``i`` (0-based over the subject's sessions) of
  subject ``s`` shows the 0-based 73k id ``subjectim[s - 1, masterordering[i] - 1] - 1``; trials with
  ``masterordering <= len(sharedix)`` (1000 in NSD) show shared images, the test set; ``stimpattern``
  (sessions, runs, slots), when present, gives the trials per session and the run of each trial;
- stimuli ``nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5`` (``imgBrick``, (N, S, S, 3) uint8), resized once;
- ROI volumes ``prf-visualrois``, ``floc-faces``, ``floc-places``, ``floc-bodies``, ``floc-words``, ``streams``
  under the mask's ``roi/`` folder when present, label names from ``<roi>.mgz.ctab`` beside them or in
  ``nsddata/freesurfer/subjXX/label/``; written per voxel to ``nsd_rois.npz``.

Bounded memory: a first pass reads one session at a time (in chunks of volumes), checks it, and keeps its masked
betas (T, V) int16 in a cache below the subject's output directory (removed once the subject is complete); the
shards are then written from memory-mapped cache files. Every output is written atomically; a re-run resumes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from datamodules.common import DataFormatError, atomic_path, remove_stale_temporaries, write_json_atomic
from datamodules.shard_format import subject_name
from datamodules.subject_writer import TrialTable, WriteOptions, summarise, write_subject

GLMS = ("betas_fithrf_GLMdenoise_RR", "betas_fithrf", "betas_assumehrf")
DEFAULT_GLM = GLMS[0]
ROI_ATLASES = ("prf-visualrois", "floc-faces", "floc-places", "floc-bodies", "floc-words", "streams")
# one label per voxel for the analyses (``voxel_roi``): category-selective ROIs over visual areas over streams
ROI_PRIORITY = ("floc-faces", "floc-bodies", "floc-places", "floc-words", "prf-visualrois", "streams")
NORMALISATIONS = ("session", "train")
DESIGNS = ("expdesign", "responses")
NSD_SHARED = 1000  # shared images in NSD (len(sharedix)), used when only responses.tsv is at hand
PSC_SCALE = 300.0
CACHE_DIR = ".nsd_raw_cache"
VOLUME_CHUNK = 16  # volumes read at a time from one session file


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise DataFormatError(f"missing {what}: {path}")
    return path


def _read_errors() -> tuple[type[BaseException], ...]:
    from nibabel.filebasedimages import ImageFileError

    return (OSError, EOFError, ValueError, zlib.error, ImageFileError)


def load_nifti(path: Path, what: str):
    """The NIfTI image (header only; data stays on disk); a file nibabel cannot parse raises naming it."""
    import nibabel as nib

    _require(path, what)
    try:
        return nib.load(str(path), keep_file_open=True)
    except _read_errors() as exc:
        raise DataFormatError(f"cannot read {what} {path}: {exc}") from exc


def read_nifti_data(image, path: Path, index: Any = ...) -> np.ndarray:
    """``image.dataobj[index]`` as an array; a truncated or corrupt file raises naming it."""
    try:
        return np.asarray(image.dataobj[index])
    except _read_errors() as exc:
        raise DataFormatError(f"{path} is truncated or corrupt: {exc}") from exc


def read_ctab(path: Path) -> dict[int, str]:
    """A FreeSurfer colour table (``index name R G B A`` lines) -> {index: name}, index 0 dropped."""
    table = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        try:
            table[int(parts[0])] = parts[1]
        except (ValueError, IndexError) as exc:
            raise DataFormatError(f"{path}: bad colour table line {line!r}") from exc
    table.pop(0, None)
    return table


def load_design(path: Path) -> dict[str, np.ndarray]:
    """``masterordering`` (T,), ``subjectim`` (subjects, slots), ``sharedix`` (shared,) as 1-based int64 arrays,
    and ``stimpattern`` (sessions, runs, slots) or None."""
    from scipy.io import loadmat

    _require(path, "NSD design file")
    try:
        mat = loadmat(str(path))
    except Exception as exc:  # scipy raises several types for a corrupt .mat
        raise DataFormatError(f"cannot read NSD design file {path}: {exc}") from exc
    design = {}
    for key in ("masterordering", "subjectim", "sharedix"):
        if key not in mat:
            raise DataFormatError(f"{path} has no variable {key!r}")
        value = np.asarray(mat[key], np.float64)
        if not np.isfinite(value).all() or (value != np.round(value)).any() or value.min() < 1:
            raise DataFormatError(f"{path} variable {key!r} must hold positive integers (1-based indices)")
        design[key] = value.astype(np.int64)
    design["masterordering"] = design["masterordering"].ravel()
    design["sharedix"] = design["sharedix"].ravel()
    if design["subjectim"].ndim != 2:
        raise DataFormatError(f"{path} variable 'subjectim' has shape {design['subjectim'].shape}, expected 2-D")
    if design["masterordering"].max() > design["subjectim"].shape[1]:
        raise DataFormatError(f"{path}: masterordering value {design['masterordering'].max()} exceeds the "
                              f"{design['subjectim'].shape[1]} columns of subjectim")
    pattern = mat.get("stimpattern")
    design["stimpattern"] = np.asarray(pattern) if pattern is not None and np.ndim(pattern) == 3 else None
    return design


def load_responses(path: Path) -> dict[str, np.ndarray]:
    """NSD's per-subject ``responses.tsv`` (tab-separated, header row): columns ``SESSION``, ``RUN``, ``73KID``
    (1-based), ``10KID`` (1-based index into the subject's 10k images, = masterordering) and, when present,
    ``TRIAL`` (within the run), as int64 arrays in chronological order."""
    _require(path, "NSD responses file")
    lines = [line.split("\t") for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise DataFormatError(f"{path} is empty")
    header = [h.strip() for h in lines[0]]
    needed = ["SESSION", "RUN", "73KID", "10KID"]
    missing = [c for c in needed if c not in header]
    if missing:
        raise DataFormatError(f"{path} lacks the column(s) {', '.join(missing)} (found {', '.join(header)})")
    columns = needed + (["TRIAL"] if "TRIAL" in header else [])
    try:
        values = np.array([[float(row[header.index(c)]) for c in columns] for row in lines[1:]])
    except (ValueError, IndexError) as exc:
        raise DataFormatError(f"{path}: bad row ({exc})") from exc
    if values.size == 0 or not np.isfinite(values).all() or values.min() < 1:
        raise DataFormatError(f"{path}: columns {', '.join(columns)} must hold positive integers")
    values = values.astype(np.int64)
    table = {c: values[:, k] for k, c in enumerate(columns)}
    order = np.lexsort((table["TRIAL"], table["RUN"], table["SESSION"])) if "TRIAL" in table \
        else np.arange(len(values))
    return {c: v[order] for c, v in table.items()}


def nsd_paths(root: Path, subject: str, glm: str) -> dict[str, Path]:
    func = root / "nsddata" / "ppdata" / subject / "func1pt8mm"
    return {"betas_dir": root / "nsddata_betas" / "ppdata" / subject / "func1pt8mm" / glm,
            "roi_dir": func / "roi", "mask": func / "roi" / "nsdgeneral.nii.gz", "mean": func / "mean.nii.gz",
            "design": root / "nsddata" / "experiments" / "nsd" / "nsd_expdesign.mat",
            "responses": root / "nsddata" / "ppdata" / subject / "behav" / "responses.tsv",
            "stimuli": root / "nsddata_stimuli" / "stimuli" / "nsd" / "nsd_stimuli.hdf5",
            "ctab_dir": root / "nsddata" / "freesurfer" / subject / "label"}


class _SessionFile:
    """One session's betas, NIfTI (X, Y, Z, T) or NSD's HDF5 ``betas`` ((T, Z, Y, X) or (X, Y, Z, T))."""

    def __init__(self, path: Path, mask_shape: tuple[int, ...], mask_affine: np.ndarray, mask_path: Path):
        self.path = path
        self._h5 = None
        if path.suffix == ".hdf5":
            import h5py

            try:
                self._h5 = h5py.File(path, "r")
                data = self._h5["betas"]
            except (OSError, KeyError) as exc:
                raise DataFormatError(f"cannot read betas dataset 'betas' of {path}: {exc}") from exc
            if data.ndim == 4 and tuple(data.shape[1:]) == tuple(mask_shape[::-1]):
                self.transposed, self.num_trials = True, int(data.shape[0])
            elif data.ndim == 4 and tuple(data.shape[:3]) == tuple(mask_shape):
                self.transposed, self.num_trials = False, int(data.shape[3])
            else:
                raise DataFormatError(f"{path} key 'betas' has shape {data.shape}; the mask {mask_path} has "
                                      f"{mask_shape} (expected (T, {', '.join(map(str, mask_shape[::-1]))}))")
            self._data = data
            self.dtype = data.dtype
            return
        self.image = load_nifti(path, "betas session file")
        shape = self.image.shape
        if len(shape) != 4 or tuple(shape[:3]) != tuple(mask_shape):
            raise DataFormatError(f"{path} has shape {shape}; the mask {mask_path} has {mask_shape} (expected "
                                  "a 4-D (X, Y, Z, trials) volume on the mask's grid)")
        if not np.allclose(self.image.affine, mask_affine, atol=1e-4):
            raise DataFormatError(f"{path}: affine differs from the mask {mask_path} "
                                  f"({np.round(self.image.affine, 3).tolist()} vs "
                                  f"{np.round(mask_affine, 3).tolist()})")
        self.num_trials = int(shape[3])
        self.dtype = self.image.get_data_dtype()

    def chunks(self, flat_index: np.ndarray):
        """Yield (T_chunk, V) masked betas in trial order, ``VOLUME_CHUNK`` volumes at a time."""
        for start in range(0, self.num_trials, VOLUME_CHUNK):
            stop = min(start + VOLUME_CHUNK, self.num_trials)
            if self._h5 is not None:
                try:
                    block = np.asarray(self._data[start:stop] if self.transposed else self._data[..., start:stop])
                except OSError as exc:
                    raise DataFormatError(f"{self.path} is truncated or corrupt: {exc}") from exc
                block = block.transpose(3, 2, 1, 0) if self.transposed else block
            else:
                block = read_nifti_data(self.image, self.path, (..., slice(start, stop)))
            yield block.reshape(-1, stop - start)[flat_index].T

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()


class RawNSDSource:
    """``SubjectSource`` over one subject of a raw NSD release: mask, design, trial table and the per-session
    cache of masked betas (``prepare``); ``read_voxels`` returns normalised betas."""

    def __init__(self, root: str | Path, subject: str, *, glm: str = DEFAULT_GLM, mask: str | Path | None = None,
                 sessions: int | None = None, normalise: str = "session", ncsnr_threshold: float | None = None,
                 design: str = "expdesign"):
        import h5py

        if design not in DESIGNS:
            raise DataFormatError(f"--design {design!r} is not one of {', '.join(DESIGNS)}")
        self.design_source = design

        if glm not in GLMS:
            raise DataFormatError(f"--glm {glm!r} is not one of {', '.join(GLMS)}")
        if normalise not in NORMALISATIONS:
            raise DataFormatError(f"--normalise {normalise!r} is not one of {', '.join(NORMALISATIONS)}")
        self.root, self.subject, self.glm, self.normalise = Path(root), subject, glm, normalise
        self.subject_index = int(subject.removeprefix("subj"))
        self.paths = nsd_paths(self.root, subject, glm)
        self.mask_path = Path(mask) if mask else self.paths["mask"]
        mask_image = load_nifti(self.mask_path, "mask")
        mask_volume = read_nifti_data(mask_image, self.mask_path)
        if mask_volume.ndim != 3:
            raise DataFormatError(f"mask {self.mask_path} has shape {mask_volume.shape}, expected 3-D")
        self.mask_shape, self.affine = tuple(mask_volume.shape), np.asarray(mask_image.affine)
        self.mask_header = mask_image.header
        self.flat_index = np.flatnonzero(mask_volume.ravel() > 0)
        self.ncsnr_threshold = ncsnr_threshold
        if ncsnr_threshold is not None:
            ncsnr_path = self.paths["betas_dir"] / "ncsnr.nii.gz"
            ncsnr = self._grid_volume(ncsnr_path, "ncsnr volume (needed by --ncsnr-threshold)").ravel()
            keep = np.isfinite(ncsnr[self.flat_index]) & (ncsnr[self.flat_index] >= ncsnr_threshold)
            self.flat_index = self.flat_index[keep]
        if len(self.flat_index) == 0:
            raise DataFormatError(f"mask {self.mask_path} selects no voxels"
                                  + (f" with ncsnr >= {ncsnr_threshold}" if ncsnr_threshold is not None else ""))
        self.num_voxels = len(self.flat_index)
        self.session_paths = self._session_paths()
        if sessions is not None and sessions < 1:
            raise DataFormatError(f"--sessions must be at least 1 (got {sessions})")
        self.num_sessions = len(self.session_paths) if sessions is None else sessions
        if self.num_sessions > len(self.session_paths):
            missing = self.paths["betas_dir"] / f"betas_session{len(self.session_paths) + 1:02d}.nii.gz"
            raise DataFormatError(f"missing betas session file: {missing} (--sessions {sessions})")
        use_mat = design == "expdesign" or self.paths["design"].exists()
        self.design = load_design(self.paths["design"]) if use_mat else None
        self.session_trials = []
        for path in self.session_paths:
            session = _SessionFile(path, self.mask_shape, self.affine, self.mask_path)
            self.session_trials.append(session.num_trials)
            session.close()
        self.trials = self._trial_table()
        try:
            self._images_file = h5py.File(_require(self.paths["stimuli"], "NSD stimuli file"), "r")
        except OSError as exc:
            raise DataFormatError(f"cannot open HDF5 file {self.paths['stimuli']}: {exc}") from exc
        if "imgBrick" not in self._images_file:
            raise DataFormatError(f"{self.paths['stimuli']} has no dataset 'imgBrick'")
        self._images = self._images_file["imgBrick"]
        if self._images.ndim != 4 or self._images.shape[3] != 3 or self._images.shape[1] != self._images.shape[2]:
            raise DataFormatError(f"{self.paths['stimuli']} key 'imgBrick' has shape {self._images.shape}, "
                                  "expected (N, S, S, 3)")
        bad = self.trials.nsd_id >= self._images.shape[0]
        if bad.any():
            design_file = self.paths["responses" if design == "responses" else "design"]
            raise DataFormatError(f"{design_file}: 73k id {int(self.trials.nsd_id[bad][0])} of {subject} "
                                  f"is out of range for {self.paths['stimuli']} key 'imgBrick' with "
                                  f"{self._images.shape[0]} images")
        self.image_size = int(self._images.shape[1])
        self.cache: Path | None = None
        self._stats: tuple[np.ndarray, np.ndarray] | None = None

    # ----------------------------------------------------------------------------------------------- layout
    def _grid_volume(self, path: Path, what: str) -> np.ndarray:
        """A 3-D volume that must lie on the mask's grid (shape and affine)."""
        image = load_nifti(path, what)
        if tuple(image.shape[:3]) != self.mask_shape or len(image.shape) != 3:
            raise DataFormatError(f"{what} {path} has shape {image.shape}; the mask {self.mask_path} has "
                                  f"{self.mask_shape}")
        if not np.allclose(image.affine, self.affine, atol=1e-4):
            raise DataFormatError(f"{what} {path}: affine differs from the mask {self.mask_path}")
        return read_nifti_data(image, path)

    def _session_paths(self) -> list[Path]:
        directory = _require(self.paths["betas_dir"], f"betas directory of {self.subject} ({self.glm})")
        found = {}
        for path in [*directory.glob("betas_session*.nii.gz"), *directory.glob("betas_session*.hdf5")]:
            number = path.name.removeprefix("betas_session").split(".")[0]
            if number.isdigit():
                found.setdefault(int(number), path)
        if not found:
            raise DataFormatError(f"missing betas session files: no {directory}/betas_sessionNN.nii.gz")
        for n in range(1, max(found) + 1):
            if n not in found:
                raise DataFormatError(f"missing betas session file: {directory / f'betas_session{n:02d}.nii.gz'} "
                                      f"(sessions up to {max(found):02d} are present)")
        return [found[n] for n in range(1, max(found) + 1)]

    def _trial_table(self) -> TrialTable:
        if self.design_source == "responses":
            return self._trial_table_from_responses()
        design, path = self.design, self.paths["design"]
        if self.subject_index > design["subjectim"].shape[0]:
            raise DataFormatError(f"{path}: subjectim has {design['subjectim'].shape[0]} rows, no {self.subject}")
        pattern = design["stimpattern"]
        runs = []
        for n, (count, betas_path) in enumerate(zip(self.session_trials, self.session_paths), start=1):
            if pattern is not None:
                if n > pattern.shape[0]:
                    raise DataFormatError(f"{betas_path}: {path} (stimpattern) describes only "
                                          f"{pattern.shape[0]} sessions")
                per_run = (np.asarray(pattern[n - 1]) > 0).sum(axis=-1)
                if int(per_run.sum()) != count:
                    raise DataFormatError(f"{betas_path} holds {count} trials; {path} (stimpattern) gives "
                                          f"session {n} {int(per_run.sum())} trials")
                runs.append(np.repeat(np.arange(1, len(per_run) + 1), per_run))
            else:  # equal split over NSD's 12 runs
                runs.append(np.arange(count) * 12 // count + 1)
        total = sum(self.session_trials)
        mo = design["masterordering"]
        if total > len(mo):
            raise DataFormatError(f"{self.session_paths[-1]}: the {len(self.session_paths)} session files hold "
                                  f"{total} trials, more than the {len(mo)} of masterordering in {path}")
        shared = len(design["sharedix"])
        row = design["subjectim"][self.subject_index - 1]
        if set(row[:shared].tolist()) != set(design["sharedix"].tolist()):
            raise DataFormatError(f"{path}: the first {shared} subjectim entries of {self.subject} are not the "
                                  "shared images of sharedix")
        slots = mo[:total]
        session = np.repeat(np.arange(1, len(self.session_trials) + 1), self.session_trials)
        trial = np.concatenate([np.arange(c) for c in self.session_trials])
        return TrialTable(nsd_id=row[slots - 1] - 1, session=session, run=np.concatenate(runs), trial=trial,
                          global_trial=np.arange(total), is_test=slots <= shared)

    def _trial_table_from_responses(self) -> TrialTable:
        """Trials from ``responses.tsv``: its rows of each session present, in order, must match the session's
        betas count; shared = ``10KID <= len(sharedix)`` (from ``nsd_expdesign.mat`` when present, else 1000)."""
        path = self.paths["responses"]
        table = load_responses(path)
        shared = len(self.design["sharedix"]) if self.design is not None else NSD_SHARED
        parts = []
        for n, (count, betas_path) in enumerate(zip(self.session_trials, self.session_paths), start=1):
            rows = np.flatnonzero(table["SESSION"] == n)
            if len(rows) != count:
                raise DataFormatError(f"{betas_path} holds {count} trials; {path} lists {len(rows)} for session {n}")
            parts.append(rows)
        rows = np.concatenate(parts)
        total = len(rows)
        return TrialTable(nsd_id=table["73KID"][rows] - 1, session=table["SESSION"][rows], run=table["RUN"][rows],
                          trial=np.concatenate([np.arange(c) for c in self.session_trials]),
                          global_trial=np.arange(total), is_test=table["10KID"][rows] <= shared)

    # ----------------------------------------------------------------------------------------------- cache
    def recipe(self) -> dict[str, Any]:
        mask_digest = hashlib.sha256(self.mask_path.read_bytes()).hexdigest()[:16]
        return {"glm": self.glm, "design": self.design_source, "mask": str(self.mask_path.resolve()),
                "mask_sha256": mask_digest,
                "ncsnr_threshold": self.ncsnr_threshold, "voxels": self.num_voxels,
                "session_trials": self.session_trials}

    def _session_cache(self, n: int) -> tuple[Path, Path]:
        assert self.cache is not None
        return self.cache / f"session-{n:02d}.npy", self.cache / f"session-{n:02d}.stats.npz"

    def prepare(self, cache: Path, progress: bool = True) -> None:
        """First pass, one session at a time: check each session file, cache its masked betas and the sums of
        its training trials; sessions cached by an interrupted run are kept."""
        self.cache = cache
        cache.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(cache)
        state, wanted = cache / "recipe.json", json.loads(json.dumps(self.recipe()))
        if state.exists() and json.loads(state.read_text()) != wanted:
            raise DataFormatError(f"{cache.parent} holds a partial import with other options; choose a new --out "
                                  "or delete that directory")
        write_json_atomic(state, wanted)
        for n, path in enumerate(tqdm(self.session_paths, desc=f"{self.subject} sessions", unit="session",
                                      disable=not progress), start=1):
            betas_cache, stats_cache = self._session_cache(n)
            identity = np.array([path.stat().st_size, path.stat().st_mtime_ns], np.int64)  # a replaced file is reread
            if betas_cache.exists() and stats_cache.exists() and \
                    np.array_equal(np.load(stats_cache).get("source", np.zeros(0)), identity):
                continue
            session = _SessionFile(path, self.mask_shape, self.affine, self.mask_path)
            try:
                parts = list(session.chunks(self.flat_index))
            finally:
                session.close()
            block = np.concatenate(parts)
            if not np.issubdtype(block.dtype, np.integer) and not np.isfinite(block).all():
                t, v = np.argwhere(~np.isfinite(block))[0]
                raise DataFormatError(f"{path}: trial {int(t)} (0-based) voxel {int(v)} of the mask is NaN or Inf")
            train = block[~self.trials.is_test[self.trials.session == n]].astype(np.float64) / self._scale(block)
            with atomic_path(betas_cache) as tmp, open(tmp, "wb") as handle:
                np.save(handle, block)
            with atomic_path(stats_cache) as tmp, open(tmp, "wb") as handle:
                np.savez(handle, n=len(train), sum=train.sum(0), sum_sq=np.square(train).sum(0), source=identity)
        self._stats = self._normalisation_stats()

    @staticmethod
    def _scale(block: np.ndarray) -> float:
        """int16 betas are percent signal change x 300; float betas are taken as percent signal change."""
        return PSC_SCALE if np.issubdtype(block.dtype, np.integer) else 1.0

    def _normalisation_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """(sessions, V) mean and std: per session over its training trials, or (``train``) the same pooled
        row for every session over the training trials of the imported sessions. Test trials never count."""
        sums = [np.load(self._session_cache(n)[1]) for n in range(1, len(self.session_paths) + 1)]
        if self.normalise == "session":
            groups = [[s] for s in sums]
        else:
            pooled = sums[: self.num_sessions]
            groups = [pooled] * len(sums)
        means, stds = [], []
        for n, group in enumerate(groups, start=1):
            count = sum(int(g["n"]) for g in group)
            if count < 2:
                raise DataFormatError(f"{self.session_paths[n - 1]}: fewer than 2 training trials for the "
                                      f"{self.normalise} z-score statistics")
            mean = sum(g["sum"] for g in group) / count
            std = np.sqrt(np.maximum(sum(g["sum_sq"] for g in group) / count - mean**2, 0.0))
            std[std == 0] = 1.0
            means.append(mean)
            stds.append(std)
        return np.stack(means).astype(np.float32), np.stack(stds).astype(np.float32)

    # ----------------------------------------------------------------------------------------------- source
    def read_voxels(self, rows: np.ndarray) -> np.ndarray:
        assert self._stats is not None, "prepare() first"
        rows = np.asarray(rows)
        out = np.empty((len(rows), self.num_voxels), np.float32)
        session, trial = self.trials.session[rows], self.trials.trial[rows]
        mean, std = self._stats
        for n in np.unique(session):
            sel = session == n
            block = np.load(self._session_cache(int(n))[0], mmap_mode="r")
            values = np.asarray(block[trial[sel]], np.float64) / self._scale(block)
            out[sel] = (values - mean[n - 1]) / std[n - 1]
        return out

    def read_images(self, nsd_ids: np.ndarray) -> np.ndarray:
        return np.asarray(self._images[np.asarray(nsd_ids)], np.uint8)

    def roi_labels(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Per-voxel labels (V,) int16 of every ROI volume present beside the mask, and their description."""
        labels, described = {}, {}
        for atlas in ROI_ATLASES:
            path = self.mask_path.parent / f"{atlas}.nii.gz"
            if not path.exists():
                continue
            volume = self._grid_volume(path, "ROI volume").ravel()
            values = np.round(volume[self.flat_index]).astype(np.int16)
            values[values < 0] = 0  # NSD marks voxels outside the brain with -1
            table_path = next((p for p in (path.parent / f"{atlas}.mgz.ctab", self.paths["ctab_dir"] /
                                           f"{atlas}.mgz.ctab") if p.exists()), None)
            table = read_ctab(table_path) if table_path else {}
            for k in np.unique(values[values > 0]).tolist():
                table.setdefault(int(k), f"{atlas}-{k}")
            labels[atlas] = values
            described[atlas] = {"source": str(path), "label_table": str(table_path) if table_path else None,
                                "names": {str(k): v for k, v in sorted(table.items())},
                                "voxels_labelled": int((values > 0).sum())}
        return labels, described

    def close(self) -> None:
        self._images_file.close()


def combine_roi_labels(labels: dict[str, np.ndarray], described: dict[str, Any]) -> tuple[np.ndarray, list[str]]:
    """One ROI per voxel from the per-file labels: the first of ``ROI_PRIORITY`` that labels it (so a voxel in
    FFA-1 and the ventral stream is FFA-1), ``none`` where no file does. Returns (V,) int16 indices into the names
    (``none`` first; a name used by two files is prefixed with its file)."""
    atlases = [a for a in ROI_PRIORITY if a in labels]
    num_voxels = len(next(iter(labels.values())))
    names, combined = ["none"], np.zeros(num_voxels, np.int16)
    every = [v for a in atlases for v in described[a]["names"].values()]
    for atlas in reversed(atlases):  # lower priority first, overwritten by higher
        for key, name in described[atlas]["names"].items():
            sel = labels[atlas] == int(key)
            if not sel.any():
                continue
            label = name if every.count(name) == 1 else f"{atlas}:{name}"
            if label not in names:
                names.append(label)
            combined[sel] = names.index(label)
    return combined, names


def _load_json_map(path: Path | None, what: str) -> dict[int, list[str]]:
    if path is None:
        return {}
    try:
        raw = json.loads(_require(path, f"{what} file").read_text())
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{what} file {path} is not valid JSON: {exc}") from exc
    return {int(k): [v] if isinstance(v, str) else list(v) for k, v in raw.items()}


def _normalisation(source: RawNSDSource) -> dict[str, Any]:
    if source.normalise == "session":
        text = ("per-voxel z-score within each session, mean/std over that session's training (non-shared) "
                "trials, applied to all its trials; test trials never enter the statistics")
    else:
        text = (f"per-voxel z-score with mean/std over the training (non-shared) trials of the "
                f"{source.num_sessions} imported sessions, applied to every trial")
    return {"kind": f"zscore_{source.normalise}", "stats": "norm_stats.npz", "description": text}


def import_nsd_raw(nsd_root: str | Path, out: str | Path, subjects: Sequence[int | str], *, glm: str = DEFAULT_GLM,
                   mask: str | None = None, normalise: str = "session", ncsnr_threshold: float | None = None,
                   sessions: int | None = None, design: str = "expdesign", image_size: int | None = None,
                   image_format: str = "png", captions: str | Path | None = None, coco_categories: str | Path | None = None,
                   test_shard_size: int = 250, chunk_rows: int = 256, progress: bool = True,
                   ) -> dict[str, dict[str, Any]]:
    """Convert subjects of a raw NSD release into our shard format; returns per-subject summary counts.

    ``mask`` is a mask file, optionally with ``{subject}`` (default each subject's nsdgeneral). With
    ``sessions`` N, training shards hold sessions 1..N; the test set holds the shared trials of every session
    present (as MindEyeV2's ``new_test``), and ``train`` normalisation uses sessions 1..N only.
    """
    root = Path(nsd_root)
    _require(root, "NSD root directory")
    caption_map = _load_json_map(Path(captions) if captions else None, "--captions")
    category_map = _load_json_map(Path(coco_categories) if coco_categories else None, "--coco-categories")
    summary = {}
    for subj in subjects:
        name = subject_name(subj)
        source = RawNSDSource(root, name, glm=glm, mask=mask.format(subject=name) if mask else None,
                              sessions=sessions, normalise=normalise, ncsnr_threshold=ncsnr_threshold,
                              design=design)
        try:
            meta = _import_subject(source, Path(out), image_size=image_size, image_format=image_format,
                                   test_shard_size=test_shard_size, chunk_rows=chunk_rows, captions=caption_map,
                                   categories=category_map, progress=progress)
        finally:
            source.close()
        summary[name] = summarise(meta)
    return summary


def _import_subject(source: RawNSDSource, out: Path, *, image_size: int | None, image_format: str,
                    test_shard_size: int, chunk_rows: int, captions: dict, categories: dict,
                    progress: bool) -> dict[str, Any]:
    name, subject_dir = source.subject, out / source.subject
    size = image_size or min(224, source.image_size)
    if size > source.image_size:
        raise DataFormatError(f"--image-size {size} exceeds the {source.image_size} px of {source.paths['stimuli']}")
    recipe = {"nsd_root": str(source.root.resolve()), "glm": source.glm, "design_source": source.design_source,
              "mask": str(source.mask_path),
              "ncsnr_threshold": source.ncsnr_threshold, "normalise": source.normalise,
              "train_sessions": source.num_sessions, "sessions_present": len(source.session_paths),
              "trials_per_session": source.session_trials, "voxel_order": "C order of the mask volume",
              "stimuli": str(source.paths["stimuli"]),
              "design": str(source.paths["responses" if source.design_source == "responses" else "design"]),
              "betas": [str(p) for p in source.session_paths], "psc_scale": PSC_SCALE}
    options = WriteOptions(
        sessions=list(range(1, source.num_sessions + 1)), image_size=size, image_format=image_format,
        test_shard_size=test_shard_size, chunk_rows=chunk_rows, normalisation=_normalisation(source),
        source=f"nsd_raw:{source.root.resolve()} glm={source.glm} mask={source.mask_path} "
               f"design={source.design_source} normalise={source.normalise} "
               f"ncsnr_threshold={source.ncsnr_threshold} "
               f"train_sessions={source.num_sessions}")
    cache = subject_dir / CACHE_DIR
    complete = (subject_dir / "meta.json").exists()
    labels, rois = ({}, {}) if complete else source.roi_labels()
    combined, names = combine_roi_labels(labels, rois) if labels else (None, [])
    extra_files: dict[str, Any] = {}
    if not complete:
        source.prepare(cache, progress=progress)
        mean, std = source._stats
        extra_files = {
            "norm_stats.npz": lambda p: _save_npz(p, mean=mean, std=std, sessions=np.arange(1, len(mean) + 1)),
            "voxel_mask.nii.gz": lambda p: _save_mask(p, source),
            "voxel_index.npy": lambda p: _save_npy(p, source.flat_index.astype(np.int64)),
        }
        if labels:
            extra_files["nsd_rois.npz"] = lambda p: _save_npz(p, **labels)
            extra_files["voxel_roi.npy"] = lambda p: _save_npy(p, combined)
        if source.paths["mean"].exists():
            extra_files["mean.nii.gz"] = lambda p: p.write_bytes(source.paths["mean"].read_bytes())
    extra_meta = {"roi_mask": "voxel_mask.nii.gz", "voxel_index": "voxel_index.npy",
                  "mean_volume": "mean.nii.gz" if source.paths["mean"].exists() else None,
                  "nsd_rois": {"file": "nsd_rois.npz", "atlases": rois} if labels else None,
                  "voxel_roi": {"labels": "voxel_roi.npy", "names": names,
                                "description": "one ROI per voxel from nsd_rois: " + " > ".join(ROI_PRIORITY)
                                               + "; none = in no ROI file"} if labels else None,
                  "nsd_raw": recipe}
    meta = write_subject(source, source.trials, out, name, options, captions=captions, categories=categories,
                         extra_meta=extra_meta, extra_files=extra_files, progress=progress)
    shutil.rmtree(cache, ignore_errors=True)
    return meta


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as handle:
        np.save(handle, array)


def _save_mask(path: Path, source: RawNSDSource) -> None:
    """The voxels imported (after any ncsnr selection) as a 1/0 int16 volume on the mask's grid and affine."""
    import gzip

    import nibabel as nib

    volume = np.zeros(int(np.prod(source.mask_shape)), np.int16)
    volume[source.flat_index] = 1
    image = nib.Nifti1Image(volume.reshape(source.mask_shape), source.affine)
    image.set_sform(source.affine, code=1)
    image.set_qform(source.affine, code=1)
    path.write_bytes(gzip.compress(image.to_bytes(), mtime=0))
