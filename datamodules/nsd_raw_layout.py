"""Write the synthetic dataset in NSD's own raw layout (a miniature NSD release) for the raw-NSD importer's tests.

Files, names as in NSD's data manual (``XX`` = subject, ``NN`` = session, both 1-based, two digits):

- ``nsddata_betas/ppdata/subjXX/func1pt8mm/<glm>/betas_sessionNN.nii.gz``: (X, Y, Z, T) int16, percent signal
  change x 300 (the synthetic raw betas are taken as percent signal change), the subject's voxels inside its
  mask volume, zeros elsewhere; ``T`` = ``cfg.trials_per_session`` (NSD: 750; recorded in
  ``synthetic_layout.json``); ``<glm>/ncsnr.nii.gz`` (float32, ``sqrt(r / (1 - r))`` of the voxel's simulated
  split-half reliability ``r``, 0 for unresponsive voxels).
- ``nsddata/ppdata/subjXX/func1pt8mm/roi/nsdgeneral.nii.gz`` (1 = included, 0 elsewhere) and the ROI volumes
  ``prf-visualrois``, ``floc-faces``, ``floc-places``, ``floc-bodies``, ``floc-words``, ``streams`` (int16
  labels, 0 = none), with FreeSurfer colour tables ``nsddata/freesurfer/subjXX/label/<roi>.mgz.ctab`` (where
  NSD keeps them); ``func1pt8mm/mean.nii.gz`` a mean volume.
- ``nsddata/experiments/nsd/nsd_expdesign.mat`` (scipy): ``masterordering`` (1, T_total), ``subjectim``
  (subjects, slots), ``sharedix`` (1, shared), ``stimpattern`` (sessions, 12 runs, slots per run), 1-based as NSD.
- ``nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5``: ``imgBrick`` (N, S, S, 3) uint8.
- ``nsddata/ppdata/subjXX/behav/responses.tsv``: the design columns of NSD's file (SUBJECT, SESSION, RUN,
  TRIAL, 73KID, 10KID).

All volumes share one affine: 1.8 mm isotropic with the origin at the volume's centre (NSD's func1pt8mm grid is
1.8 mm isotropic too). NSD gives every subject the same trial order (``masterordering``, indices into the
subject's own ``subjectim`` row, shared images first); ``nsd_like`` reorders the simulated trials of every
subject after the first to follow the first subject's order, so both layouts are written from the same data.

Synthetic ROI types -> NSD ROI labels (a naming convention for the tests and the reports, not a claim about
the simulated responses):

====================  =================================  ==================
synthetic type         prf-visualrois / floc-*             streams
====================  =================================  ==================
low_level              V1v V1d V2v V2d V3v V3d hV4 (7      early
                       equal parts along x)
mid_level              --                                  midventral / midlateral / midparietal (thirds along z)
category_animal        floc-faces FFA-1                    ventral
category_sports        floc-bodies EBA                     lateral
category_furniture     floc-places PPA                     ventral
category_vehicle       floc-places OPA                     parietal
category_kitchen       floc-words VWFA-1 (arbitrary: no    ventral
                       synthetic type is word-selective)
category_food          -- (NSD has no food localiser)      ventral
unresponsive           --                                  --
====================  =================================  ==================

A few voxels outside the mask also carry labels (real ROI volumes are not restricted to nsdgeneral), so an
importer that reads labels outside its voxel order is caught.
"""

from __future__ import annotations

import dataclasses
import gzip
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.common import DataFormatError, atomic_path, write_json_atomic
from datamodules.subject_writer import TrialTable
from datamodules.synthetic import CATEGORIES, ROI_NAMES, RUNS_PER_SESSION, SubjectModel, SyntheticNSD

DEFAULT_GLM = "betas_fithrf_GLMdenoise_RR"
PSC_SCALE = 300.0  # NSD stores betas as int16 percent signal change x 300
ROI_TABLES: dict[str, dict[int, str]] = {
    "prf-visualrois": {1: "V1v", 2: "V1d", 3: "V2v", 4: "V2d", 5: "V3v", 6: "V3d", 7: "hV4"},
    "floc-faces": {1: "OFA", 2: "FFA-1", 3: "FFA-2", 4: "mTL-faces", 5: "aTL-faces"},
    "floc-places": {1: "OPA", 2: "PPA", 3: "RSC"},
    "floc-bodies": {1: "EBA", 2: "FBA-1", 3: "FBA-2", 4: "mTL-bodies"},
    "floc-words": {1: "OWFA", 2: "VWFA-1", 3: "VWFA-2", 4: "mfs-words", 5: "mTL-words"},
    "streams": {1: "early", 2: "midventral", 3: "midlateral", 4: "midparietal", 5: "ventral", 6: "lateral",
                7: "parietal"},
}
CATEGORY_FLOC = {"animal": ("floc-faces", "FFA-1"), "sports": ("floc-bodies", "EBA"),
                 "furniture": ("floc-places", "PPA"), "vehicle": ("floc-places", "OPA"),
                 "kitchen": ("floc-words", "VWFA-1")}
CATEGORY_STREAM = {"animal": "ventral", "sports": "lateral", "furniture": "ventral", "vehicle": "parietal",
                   "kitchen": "ventral", "food": "ventral"}
assert set(CATEGORY_STREAM) == set(CATEGORIES)


def grid_affine(shape: tuple[int, ...]) -> np.ndarray:
    """1.8 mm isotropic, origin at the volume centre (a real, non-diagonal-only affine)."""
    affine = np.diag([1.8, 1.8, 1.8, 1.0])
    affine[:3, 3] = -(np.asarray(shape[:3]) - 1) / 2 * 1.8
    return affine


def nifti_bytes(volume: np.ndarray, affine: np.ndarray) -> bytes:
    import nibabel as nib

    image = nib.Nifti1Image(volume, affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    return gzip.compress(image.to_bytes(), mtime=0)


def _write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def nsd_like(data: SyntheticNSD) -> SyntheticNSD:
    """The same subjects with NSD's shared trial order: subject 1 unchanged; every other subject's trials
    reordered (betas rows moved with them) so that trial ``i`` shows its own image of slot ``masterordering[i]``.
    Idempotent. Needs equal repeat-count histograms across subjects (true for ``simulate``)."""
    mo, subjectim = shared_design(data)
    trials, betas = {}, {}
    for s, (name, table) in enumerate(data.trials.items()):
        order = np.argsort(table.global_trial, kind="stable")
        ids = subjectim[s, mo - 1] - 1
        source_rows = np.empty(len(mo), np.int64)
        for nsd_id in np.unique(ids):
            source_rows[ids == nsd_id] = table.global_trial[order][table.nsd_id[order] == nsd_id]
        g = np.arange(len(mo))
        tps = data.cfg.trials_per_session
        trial = g % tps
        trials[name] = TrialTable(nsd_id=ids.astype(np.int64), session=g // tps + 1,
                                  run=trial * RUNS_PER_SESSION // tps + 1, trial=trial, global_trial=g,
                                  is_test=np.isin(ids, data.test_ids))
        betas[name] = data.raw_betas[name][source_rows]
    return dataclasses.replace(data, trials=trials, raw_betas=betas)


def shared_design(data: SyntheticNSD) -> tuple[np.ndarray, np.ndarray]:
    """(masterordering (T,), subjectim (subjects, slots)), both 1-based: slots 1..n_test are the shared images
    (ascending id), then the first subject's training images in order of first appearance; other subjects' images
    fill the slots with the same repeat count in their own order of first appearance."""
    names = list(data.trials)
    test_ids = np.asarray(data.test_ids)

    def first_appearance(table: TrialTable) -> tuple[np.ndarray, np.ndarray]:
        ids = table.nsd_id[np.argsort(table.global_trial, kind="stable")]
        _, first = np.unique(ids, return_index=True)
        seen = ids[np.sort(first)]
        return ids, seen[~np.isin(seen, test_ids)]

    ref_ids, ref_train = first_appearance(data.trials[names[0]])
    slot_images = np.concatenate([test_ids, ref_train])
    slot_of = {int(i): k for k, i in enumerate(slot_images)}
    mo = np.array([slot_of[int(i)] for i in ref_ids], np.int64) + 1
    counts = np.bincount(mo - 1, minlength=len(slot_images))
    subjectim = np.zeros((len(names), len(slot_images)), np.int64)
    for s, name in enumerate(names):
        ids, train = first_appearance(data.trials[name])
        own_counts = {int(i): int(c) for i, c in zip(*np.unique(ids, return_counts=True))}
        if len(train) != len(ref_train) or any(own_counts[int(t)] != counts[k] for k, t in enumerate(test_ids)):
            raise DataFormatError(f"{name} cannot follow a shared masterordering (different repeat structure)")
        row = list(test_ids)
        pools: dict[int, list[int]] = {}
        for t in train:
            pools.setdefault(own_counts[int(t)], []).append(int(t))
        for k in range(len(test_ids), len(slot_images)):
            pool = pools.get(int(counts[k]))
            if not pool:
                raise DataFormatError(f"{name} cannot follow a shared masterordering (repeat counts differ)")
            row.append(pool.pop(0))
        subjectim[s] = np.asarray(row) + 1
    return mo, subjectim


def synthetic_roi_labels(model: SubjectModel) -> dict[str, np.ndarray]:
    """Per-voxel labels (V,) int16 of every NSD ROI volume for one synthetic subject (table in the docstring)."""
    coords = np.stack(np.unravel_index(model.mask_flat_index, model.volume_shape), 1)
    labels = {name: np.zeros(model.num_voxels, np.int16) for name in ROI_TABLES}
    code = {name: {v: k for k, v in table.items()} for name, table in ROI_TABLES.items()}
    low = np.flatnonzero(model.roi == ROI_NAMES.index("low_level"))
    low = low[np.argsort(coords[low, 0], kind="stable")]
    for k, part in enumerate(np.array_split(low, 7)):
        labels["prf-visualrois"][part] = k + 1
    labels["streams"][low] = code["streams"]["early"]
    mid = np.flatnonzero(model.roi == ROI_NAMES.index("mid_level"))
    mid = mid[np.argsort(coords[mid, 2], kind="stable")]
    for part, stream in zip(np.array_split(mid, 3), ("midventral", "midlateral", "midparietal")):
        labels["streams"][part] = code["streams"][stream]
    for cat in CATEGORIES:
        sel = model.roi == ROI_NAMES.index(f"category_{cat}")
        labels["streams"][sel] = code["streams"][CATEGORY_STREAM[cat]]
        if cat in CATEGORY_FLOC:
            atlas, label = CATEGORY_FLOC[cat]
            labels[atlas][sel] = code[atlas][label]
    return labels


def write_ctab(path: Path, table: dict[int, str]) -> None:
    """A FreeSurfer colour table: ``index name R G B A`` per line, 0 = Unknown."""
    rng = np.random.default_rng(len(table))
    lines = ["#$Id: synthetic NSD colour table", "  0  Unknown  0 0 0 0"]
    lines += [f"{k:3d}  {name}  {' '.join(str(int(c)) for c in rng.integers(0, 256, 3))} 0"
              for k, name in table.items()]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def stimpattern(cfg, num_sessions: int) -> np.ndarray:
    """(sessions, 12, slots) uint8: 1 where a run's slot holds a stimulus trial; runs hold the trials of the
    synthetic design (run = trial * 12 // T + 1), with blank slots first and last as in NSD's runs."""
    tps = cfg.trials_per_session
    per_run = np.bincount(np.arange(tps) * RUNS_PER_SESSION // tps, minlength=RUNS_PER_SESSION)
    slots = int(per_run.max()) + 3
    pattern = np.zeros((num_sessions, RUNS_PER_SESSION, slots), np.uint8)
    for r, n in enumerate(per_run):
        pattern[:, r, 1: 1 + n] = 1
    return pattern


def write_responses(path: Path, subject: int, table: TrialTable, mo: np.ndarray, images: np.ndarray) -> None:
    """The subject's ``behav/responses.tsv`` with NSD's design columns (SUBJECT, SESSION, RUN, TRIAL within the
    run, 73KID and 10KID, 1-based; NSD's behavioural columns are left out), one row per trial in order."""
    order = np.argsort(table.global_trial, kind="stable")
    session, run = table.session[order], table.run[order]
    within = np.zeros(len(order), np.int64)
    for key in np.unique(session * 100 + run):
        sel = np.flatnonzero(session * 100 + run == key)
        within[sel] = np.arange(1, len(sel) + 1)
    slots = mo[table.global_trial[order]]
    assert np.array_equal(images[slots - 1] - 1, table.nsd_id[order])
    lines = ["SUBJECT\tSESSION\tRUN\tTRIAL\t73KID\t10KID"]
    lines += [f"{subject}\t{a}\t{b}\t{c}\t{d}\t{e}" for a, b, c, d, e in
              zip(session, run, within, table.nsd_id[order] + 1, slots)]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def write_nsd_raw_layout(data: SyntheticNSD, root: str | Path, glms: tuple[str, ...] = (DEFAULT_GLM,),
                         ) -> SyntheticNSD:
    """Write ``nsd_like(data)`` in NSD's raw layout below ``root``; returns the data written (write the
    MindEyeV2 layout of that same object to compare the importers). A GLM after the first gets the same betas
    plus extra noise (a different GLM of the same trials)."""
    import h5py
    from scipy.io import savemat

    root = Path(root)
    data = nsd_like(data)
    cfg = data.cfg
    mo, subjectim = shared_design(data)
    design = {"masterordering": mo[None].astype(np.float64), "subjectim": subjectim.astype(np.float64),
              "sharedix": (np.asarray(data.test_ids, np.float64) + 1)[None],
              "stimpattern": stimpattern(cfg, cfg.num_sessions)}
    design_path = root / "nsddata" / "experiments" / "nsd" / "nsd_expdesign.mat"
    design_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(design_path) as tmp, open(tmp, "wb") as handle:
        savemat(handle, design, do_compression=True)
    stimuli = root / "nsddata_stimuli" / "stimuli" / "nsd" / "nsd_stimuli.hdf5"
    with atomic_path(stimuli) as tmp, h5py.File(tmp, "w") as h5:
        h5.create_dataset("imgBrick", data=data.images, dtype=np.uint8)
    layout: dict[str, Any] = {"kind": "synthetic-nsd-raw", "config": asdict(cfg), "glms": list(glms),
                              "trials_per_session": cfg.trials_per_session, "voxels": {}}
    for s, (name, model) in enumerate(data.subjects.items()):
        shape = model.volume_shape
        affine = grid_affine(shape)
        func = root / "nsddata" / "ppdata" / name / "func1pt8mm"
        mask = np.zeros(int(np.prod(shape)), np.int16)
        mask[model.mask_flat_index] = 1
        _write_bytes(func / "roi" / "nsdgeneral.nii.gz", nifti_bytes(mask.reshape(shape), affine))
        rng = np.random.default_rng([cfg.seed, s, 17])
        outside = rng.choice(np.flatnonzero(mask == 0), size=min(25, int((mask == 0).sum())), replace=False)
        for atlas, labels in synthetic_roi_labels(model).items():
            volume = np.zeros(int(np.prod(shape)), np.int16)
            volume[model.mask_flat_index] = labels
            volume[outside] = rng.integers(1, len(ROI_TABLES[atlas]) + 1, len(outside))
            _write_bytes(func / "roi" / f"{atlas}.nii.gz", nifti_bytes(volume.reshape(shape), affine))
            write_ctab(root / "nsddata" / "freesurfer" / name / "label" / f"{atlas}.mgz.ctab", ROI_TABLES[atlas])
        table = data.trials[name]
        write_responses(root / "nsddata" / "ppdata" / name / "behav" / "responses.tsv", s + 1, table,
                        mo, subjectim[s])
        raw = data.raw_betas[name]
        mean = np.zeros(int(np.prod(shape)), np.float32)
        mean[model.mask_flat_index] = 800 + 50 * model.offset  # a plausible EPI mean intensity inside the brain
        _write_bytes(func / "mean.nii.gz", nifti_bytes(mean.reshape(shape), affine))
        rel = model.reliability
        ncsnr = np.zeros(int(np.prod(shape)), np.float32)
        ncsnr[model.mask_flat_index] = np.sqrt(rel / np.maximum(1 - rel, 1e-6))
        for g, glm in enumerate(glms):
            betas_dir = root / "nsddata_betas" / "ppdata" / name / "func1pt8mm" / glm
            values = raw if g == 0 else raw + np.random.default_rng([cfg.seed, s, g]).normal(
                0, 0.5, raw.shape).astype(np.float32)
            scaled = np.round(values.astype(np.float64) * PSC_SCALE)
            if np.abs(scaled).max() > np.iinfo(np.int16).max:
                raise DataFormatError(f"{name}: synthetic betas exceed the int16 range at x{PSC_SCALE:g}")
            _write_bytes(betas_dir / "ncsnr.nii.gz", nifti_bytes(ncsnr.reshape(shape), affine))
            for session in range(1, cfg.num_sessions + 1):
                rows = table.global_trial[table.session == session]
                volume = np.zeros((int(np.prod(shape)), len(rows)), np.int16)
                volume[model.mask_flat_index] = scaled[np.sort(rows)].T.astype(np.int16)
                _write_bytes(betas_dir / f"betas_session{session:02d}.nii.gz",
                             nifti_bytes(volume.reshape(*shape, len(rows)), affine))
        layout["voxels"][name] = model.num_voxels
    write_json_atomic(root / "synthetic_layout.json", layout)
    return data
