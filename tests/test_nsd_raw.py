"""Raw NSD importer: the same synthetic subjects through both importers agree; normalisation, GLM, ROI labels and
ncsnr selection against independent computations; every bad input gives one line naming the file; resume.

Tolerance of the betas comparisons: the raw layout stores int16 percent signal change x 300, so a raw beta is off
by at most q = 1/600 and a z-scored one by q / std_v (std_v the voxel's standard deviation in the statistics);
the statistics are computed from the quantised values (mean off by <= q / std_v, std relatively by ~q / std_v),
and both sides are stored as float16 (half a float16 spacing each). The bound per value is therefore
``(2 + |z|) * q / std_v + spacing_float16(|z|)``.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy.io import loadmat

from datamodules.common import DataFormatError
from datamodules.inspection import describe_dataset
from datamodules.mindeye2_import import import_mindeye2
from datamodules.nsd_raw_import import CACHE_DIR, import_nsd_raw
from datamodules.nsd_raw_layout import (
    ROI_TABLES,
    grid_affine,
    nifti_bytes,
    synthetic_roi_labels,
    write_nsd_raw_layout,
)
from datamodules.synthetic import ROI_NAMES, SyntheticNSDConfig, simulate, write_mindeye2_layout
from experiments._cli import run_main
from experiments.prepare_nsd import main as prepare_main
from tests.conftest import SMALL
from tests.test_import import read_shard

RR, FITHRF = "betas_fithrf_GLMdenoise_RR", "betas_fithrf"
Q = 0.5 / 300.0


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, small_sim):
    """``small_sim`` in NSD's trial order, written in both layouts (raw with two GLMs)."""
    raw_root = tmp_path_factory.mktemp("nsd_raw")
    data = write_nsd_raw_layout(small_sim, raw_root, glms=(RR, FITHRF))
    mindeye2_root = write_mindeye2_layout(data, tmp_path_factory.mktemp("mindeye2_nsd_order"))
    return data, raw_root, mindeye2_root


@pytest.fixture(scope="module")
def imported_pair(layouts, tmp_path_factory):
    """Both importers, same normalisation: MindEyeV2's release (train-trial z-score over all sessions) and the
    raw importer with ``--normalise train``."""
    data, raw_root, mindeye2_root = layouts
    out_m, out_r = tmp_path_factory.mktemp("via_mindeye2"), tmp_path_factory.mktemp("via_raw")
    import_mindeye2(mindeye2_root, out_m, [1, 2, 3], progress=False)
    summary = import_nsd_raw(raw_root, out_r, [1, 2, 3], normalise="train", progress=False)
    return out_m, out_r, summary


def _samples(out, name, kind):
    return [s for p in sorted((out / name / kind).glob("*.tar")) for s in read_shard(p)]


def _bound(z, std):
    z = np.abs(np.asarray(z, np.float64))
    return (2 + z) * Q / std + np.spacing(np.float16(z)).astype(np.float64)


def _compare(out_m, out_r, name, std, test_trial_positions=True):
    """Trials, images, repeats identical; betas within the quantisation bound. Returns (max |diff|, counts).

    ``test_trial_positions=False`` leaves out the within-session positions of test trials: the MindEyeV2
    importer with ``sessions`` below all derives them from the rows it read, which miss the later sessions'
    training trials (the raw importer's positions are checked against the design instead)."""
    meta_m = json.loads((out_m / name / "meta.json").read_text())
    meta_r = json.loads((out_r / name / "meta.json").read_text())
    assert [s["nsd_ids"] for s in meta_m["sessions"]] == [s["nsd_ids"] for s in meta_r["sessions"]]
    assert meta_m["test"]["repeat_histogram"] == meta_r["test"]["repeat_histogram"]
    worst, trials = 0.0, 0
    for kind, keys in (("train", ("nsd_id", "session", "run", "trial", "global_trial")),
                       ("test", ("nsd_id", "num_repeats", "sessions", "global_trials")
                        + (("trials",) if test_trial_positions else ()))):
        a, b = _samples(out_m, name, kind), _samples(out_r, name, kind)
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            assert {k: x["info"][k] for k in keys} == {k: y["info"][k] for k in keys}
            assert np.array_equal(x["image"], y["image"])
            va, vb = x["voxels"].astype(np.float64), y["voxels"].astype(np.float64)
            assert va.shape == vb.shape
            diff = np.abs(va - vb)
            assert (diff <= _bound(va, std)).all(), f"{name} {kind} max diff {diff.max()}"
            worst = max(worst, float(diff.max()))
            trials += len(va) if va.ndim == 2 else 1
    return worst, trials


def test_both_importers_agree_on_trials_images_repeats_and_betas(layouts, imported_pair):
    data, _, _ = layouts
    out_m, out_r, summary = imported_pair
    report = {}
    for name, table in data.trials.items():
        raw = data.raw_betas[name].astype(np.float64)
        std = raw[~table.is_test].std(0)
        report[name] = _compare(out_m, out_r, name, std)
        assert summary[name]["test_trials"] == SMALL.num_test_images * SMALL.repeats
        # the comparison can fail: the same shards with the voxels shifted by one disagree far beyond the bound
        x = read_shard(out_m / name / "train" / "session-01.tar")[0]["voxels"].astype(np.float64)
        y = read_shard(out_r / name / "train" / "session-01.tar")[0]["voxels"].astype(np.float64)
        assert np.abs(x - np.roll(y, 1)).max() > 20 * _bound(x, std).max()
    print("max |betas difference| and trials compared per subject:", report)
    assert max(w for w, _ in report.values()) < 0.02


def test_sessions_option_and_train_statistics_match_the_mindeye2_renormalisation(layouts, tmp_path):
    data, raw_root, mindeye2_root = layouts
    import_mindeye2(mindeye2_root, tmp_path / "m", ["subj02"], sessions=2, renormalise=True, progress=False)
    summary = import_nsd_raw(raw_root, tmp_path / "r", ["subj02"], sessions=2, normalise="train", progress=False)
    assert summary["subj02"]["sessions"] == 2 and summary["subj02"]["test_images"] == SMALL.num_test_images
    table = data.trials["subj02"]
    raw = data.raw_betas["subj02"].astype(np.float64)
    std = raw[~table.is_test & (table.session <= 2)].std(0)
    _compare(tmp_path / "m", tmp_path / "r", "subj02", std, test_trial_positions=False)
    for sample in _samples(tmp_path / "r", "subj02", "test"):
        info = sample["info"]
        assert info["trials"] == [g - (s - 1) * SMALL.trials_per_session
                                  for g, s in zip(info["global_trials"], info["sessions"])]
    meta = json.loads((tmp_path / "r" / "subj02" / "meta.json").read_text())
    assert meta["normalisation"]["kind"] == "zscore_train"
    assert meta["nsd_raw"]["train_sessions"] == 2 and meta["nsd_raw"]["glm"] == RR
    assert "normalise=train" in meta["provenance"]["source"] and "git_commit" in meta["provenance"]


def test_session_zscore_uses_only_the_sessions_training_trials(layouts, tmp_path):
    data, raw_root, _ = layouts
    import_nsd_raw(raw_root, tmp_path, ["subj02"], progress=False)  # default: per session
    table = data.trials["subj02"]
    raw = data.raw_betas["subj02"].astype(np.float64)
    expected, stds = np.empty_like(raw), np.empty((SMALL.num_sessions, raw.shape[1]))
    for s in range(1, SMALL.num_sessions + 1):
        rows = table.session == s
        ref = raw[rows & ~table.is_test]  # shared (test) trials never enter the statistics
        stds[s - 1] = ref.std(0)
        expected[rows] = (raw[rows] - ref.mean(0)) / ref.std(0)
    for sample in _samples(tmp_path, "subj02", "train"):
        g = sample["info"]["global_trial"]
        s = sample["info"]["session"]
        got = sample["voxels"].astype(np.float64)
        assert (np.abs(got - expected[g]) <= _bound(expected[g], stds[s - 1])).all()
    for sample in _samples(tmp_path, "subj02", "test"):
        for k, (g, s) in enumerate(zip(sample["info"]["global_trials"], sample["info"]["sessions"])):
            got = sample["voxels"][k].astype(np.float64)
            assert (np.abs(got - expected[g]) <= _bound(expected[g], stds[s - 1])).all()
    meta = json.loads((tmp_path / "subj02" / "meta.json").read_text())
    assert meta["normalisation"]["kind"] == "zscore_session"
    stats = np.load(tmp_path / "subj02" / "norm_stats.npz")
    assert stats["mean"].shape == (SMALL.num_sessions, raw.shape[1])
    assert not (tmp_path / "subj02" / CACHE_DIR).exists()  # the session cache goes once the subject is complete


def test_glm_choice_reads_that_glms_files(layouts, tmp_path):
    """``--glm betas_fithrf`` against an independent read of its NIfTI files (nibabel, scipy), design included."""
    data, raw_root, _ = layouts
    import_nsd_raw(raw_root, tmp_path, [3], glm=FITHRF, progress=False)
    design = loadmat(raw_root / "nsddata" / "experiments" / "nsd" / "nsd_expdesign.mat")
    mo = design["masterordering"].ravel().astype(int)
    ids = design["subjectim"][2, mo - 1].astype(int) - 1
    is_test = mo <= design["sharedix"].size
    func = raw_root / "nsddata" / "ppdata" / "subj03" / "func1pt8mm"
    mask = nib.load(func / "roi" / "nsdgeneral.nii.gz").get_fdata() > 0
    betas_dir = raw_root / "nsddata_betas" / "ppdata" / "subj03" / "func1pt8mm" / FITHRF
    sessions = [nib.load(betas_dir / f"betas_session{s:02d}.nii.gz").get_fdata()[mask] / 300 for s in (1, 2, 3)]
    offsets = np.cumsum([0] + [b.shape[1] for b in sessions])
    samples = _samples(tmp_path, "subj03", "train")
    assert [s["info"]["nsd_id"] for s in samples] == ids[~is_test].tolist()
    diffs = []
    for sample in samples:
        g, s = sample["info"]["global_trial"], sample["info"]["session"]
        block = sessions[s - 1]
        ref = block[:, ~is_test[offsets[s - 1]: offsets[s]]]
        expected = (block[:, g - offsets[s - 1]] - ref.mean(1)) / ref.std(1)
        assert (np.abs(sample["voxels"] - expected) <= _bound(expected, ref.std(1)) + 1e-6).all()
        raw_rr = data.raw_betas["subj03"][g]
        diffs.append(np.abs(block[:, g - offsets[s - 1]] - raw_rr).mean())
    assert np.mean(diffs) > 0.2  # it is the other GLM's data, not the default one
    assert json.loads((tmp_path / "subj03" / "meta.json").read_text())["nsd_raw"]["glm"] == FITHRF


def test_roi_labels_mask_and_ncsnr_selection(layouts, tmp_path):
    data, raw_root, _ = layouts
    import_nsd_raw(raw_root, tmp_path / "all", [1], progress=False)
    model = data.subjects["subj01"]
    folder = tmp_path / "all" / "subj01"
    meta = json.loads((folder / "meta.json").read_text())
    labels = np.load(folder / meta["nsd_rois"]["file"])
    for atlas, expected in synthetic_roi_labels(model).items():
        assert np.array_equal(labels[atlas], expected), atlas
        names = meta["nsd_rois"]["atlases"][atlas]["names"]
        assert names == {str(k): v for k, v in ROI_TABLES[atlas].items()}
    assert labels["floc-faces"].tolist().count(2) > 0  # FFA-1 present
    mask = nib.load(folder / "voxel_mask.nii.gz")
    assert np.allclose(mask.affine, grid_affine(model.volume_shape))
    assert np.array_equal(np.flatnonzero(np.asarray(mask.dataobj).ravel()), model.mask_flat_index)
    assert (folder / "mean.nii.gz").exists()
    # one ROI per voxel for the analyses, named as NSD names them
    combined = np.load(folder / meta["voxel_roi"]["labels"])
    names = np.asarray(meta["voxel_roi"]["names"])[combined]
    by_type = {"category_animal": {"FFA-1"}, "category_sports": {"EBA"}, "category_furniture": {"PPA"},
               "category_vehicle": {"OPA"}, "category_kitchen": {"VWFA-1"}, "category_food": {"ventral"},
               "low_level": set(ROI_TABLES["prf-visualrois"].values()),
               "mid_level": {"midventral", "midlateral", "midparietal"}, "unresponsive": {"none"}}
    for k, roi_type in enumerate(ROI_NAMES):
        assert set(names[model.roi == k].tolist()) <= by_type[roi_type], roi_type
    assert set(names[model.roi == ROI_NAMES.index("low_level")].tolist()) == by_type["low_level"]
    rows = describe_dataset(tmp_path / "all")  # reads a raw import (no synthetic ground truth there)
    assert rows[0]["subject"] == "subj01" and "median_split_half_responsive" not in rows[0]

    threshold = 0.8
    ncsnr = np.sqrt(model.reliability / (1 - model.reliability))
    keep = ncsnr >= threshold
    assert 0 < keep.sum() < len(keep)
    import_nsd_raw(raw_root, tmp_path / "sel", [1], ncsnr_threshold=threshold, progress=False)
    sel = tmp_path / "sel" / "subj01"
    meta_sel = json.loads((sel / "meta.json").read_text())
    assert meta_sel["num_voxels"] == keep.sum() and meta_sel["nsd_raw"]["ncsnr_threshold"] == threshold
    assert np.array_equal(np.load(sel / "voxel_index.npy"), model.mask_flat_index[keep])
    assert np.array_equal(np.load(sel / "nsd_rois.npz")["streams"], labels["streams"][keep])
    # per-session statistics are per voxel, so the selected import is exactly the full one's selected columns
    full = read_shard(folder / "train" / "session-02.tar")
    part = read_shard(sel / "train" / "session-02.tar")
    assert all(np.array_equal(a["voxels"][keep], b["voxels"]) for a, b in zip(full, part))


# --------------------------------------------------------------------------------------------- bad input
TINY = SyntheticNSDConfig(seed=1, voxels=(64,), num_sessions=3, trials_per_session=30, num_test_images=5,
                          image_size=16)


@pytest.fixture
def tiny_raw(tmp_path):
    root = tmp_path / "src"
    write_nsd_raw_layout(simulate(TINY), root)
    return root


def _betas(root, session):
    return root / "nsddata_betas" / "ppdata" / "subj01" / "func1pt8mm" / RR / f"betas_session{session:02d}.nii.gz"


def _rewrite(path, data=None, affine=None, dtype=None):
    image = nib.load(path)
    volume = np.asarray(image.dataobj) if data is None else data
    path.write_bytes(nifti_bytes(volume.astype(dtype or volume.dtype), image.affine if affine is None else affine))


def _truncated(root):
    path = _betas(root, 2)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return "betas_session02.nii.gz is truncated"


def _affine(root):
    path = _betas(root, 2)
    affine = nib.load(path).affine.copy()
    affine[0, 3] += 1.8
    _rewrite(path, affine=affine)
    return "betas_session02.nii.gz: affine differs from the mask"


def _shape(root):
    path = _betas(root, 3)
    _rewrite(path, data=np.asarray(nib.load(path).dataobj)[:-1])
    return "betas_session03.nii.gz has shape"


def _missing_session(root):
    _betas(root, 2).unlink()
    return "missing betas session file: " + str(_betas(root, 2))


def _trial_count(root):
    path = _betas(root, 2)
    _rewrite(path, data=np.asarray(nib.load(path).dataobj)[..., :-1])
    return "betas_session02.nii.gz holds 29 trials; "


def _nan(root):
    path = _betas(root, 1)
    volume = np.asarray(nib.load(path).dataobj).astype(np.float32)
    mask = nib.load(root / "nsddata" / "ppdata" / "subj01" / "func1pt8mm" / "roi" / "nsdgeneral.nii.gz")
    x, y, z = np.argwhere(np.asarray(mask.dataobj) > 0)[10]
    volume[x, y, z, 4] = np.nan
    _rewrite(path, data=volume)
    return "betas_session01.nii.gz: trial 4 (0-based) voxel 10"


def _missing_design(root):
    (root / "nsddata" / "experiments" / "nsd" / "nsd_expdesign.mat").unlink()
    return "missing NSD design file"


def _truncated_mask(root):
    path = root / "nsddata" / "ppdata" / "subj01" / "func1pt8mm" / "roi" / "nsdgeneral.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return "nsdgeneral.nii.gz"


@pytest.mark.parametrize("corrupt", [_truncated, _affine, _shape, _missing_session, _trial_count, _nan,
                                     _missing_design, _truncated_mask],
                         ids=lambda f: f.__name__.strip("_"))
def test_bad_input_one_line_naming_the_file_exit_2(tiny_raw, tmp_path, capsys, corrupt):
    expected = corrupt(tiny_raw)
    out = tmp_path / "out"
    status = run_main(prepare_main, ["--nsd-root", str(tiny_raw), "--out", str(out), "--subjects", "1", "--quiet"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert not (out / "subj01" / "meta.json").exists()
    assert not list(out.rglob("*.tmp"))


def test_sessions_beyond_the_files_and_ncsnr_without_volume(tiny_raw, tmp_path):
    with pytest.raises(DataFormatError, match="betas_session04.nii.gz"):
        import_nsd_raw(tiny_raw, tmp_path, [1], sessions=4, progress=False)
    with pytest.raises(DataFormatError, match="--sessions must be at least 1"):
        import_nsd_raw(tiny_raw, tmp_path, [1], sessions=0, progress=False)
    (tiny_raw / "nsddata_betas" / "ppdata" / "subj01" / "func1pt8mm" / RR / "ncsnr.nii.gz").unlink()
    with pytest.raises(DataFormatError, match="ncsnr.nii.gz"):
        import_nsd_raw(tiny_raw, tmp_path, [1], ncsnr_threshold=0.2, progress=False)


# --------------------------------------------------------------------------------------------- resume
def _shards(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.tar"))}


def test_interrupted_import_resumes(tiny_raw, tmp_path, monkeypatch):
    import datamodules.nsd_raw_import as raw_import
    import datamodules.subject_writer as writer

    reference = tmp_path / "reference"
    import_nsd_raw(tiny_raw, reference, [1], progress=False)
    out = tmp_path / "out"
    real_chunks, real_write_shard = raw_import._SessionFile.chunks, writer.write_shard
    reads = []

    def chunks(self, flat_index):
        reads.append(self.path.name)
        if len(reads) == 2 and interrupt["read"]:
            raise KeyboardInterrupt
        yield from real_chunks(self, flat_index)

    def write_shard(path, samples):
        if "session-02" in str(path) and interrupt["write"]:
            list(samples)
            raise KeyboardInterrupt
        return real_write_shard(path, samples)

    monkeypatch.setattr(raw_import._SessionFile, "chunks", chunks)
    monkeypatch.setattr(writer, "write_shard", write_shard)
    interrupt = {"read": True, "write": False}
    with pytest.raises(KeyboardInterrupt):  # killed while reading session 2
        import_nsd_raw(tiny_raw, out, [1], progress=False)
    cache = out / "subj01" / CACHE_DIR
    assert (cache / "session-01.npy").exists() and not (cache / "session-02.npy").exists()
    interrupt.update(read=False, write=True)
    reads.clear()
    with pytest.raises(KeyboardInterrupt):  # killed while writing the second training shard
        import_nsd_raw(tiny_raw, out, [1], progress=False)
    assert reads == ["betas_session02.nii.gz", "betas_session03.nii.gz"]  # session 1 came from the cache
    touched = _betas(tiny_raw, 3)
    touched.write_bytes(touched.read_bytes())  # a replaced session file (new mtime) is read again
    reads.clear()
    with pytest.raises(KeyboardInterrupt):
        import_nsd_raw(tiny_raw, out, [1], progress=False)
    assert reads == ["betas_session03.nii.gz"]
    first = out / "subj01" / "train" / "session-01.tar"
    mtime = first.stat().st_mtime_ns
    assert not (out / "subj01" / "train" / "session-02.tar").exists()
    interrupt.update(write=False)
    reads.clear()
    import_nsd_raw(tiny_raw, out, [1], progress=False)
    assert reads == []  # every session cached
    assert first.stat().st_mtime_ns == mtime  # finished shard kept
    assert _shards(out / "subj01") == _shards(reference / "subj01")
    assert not cache.exists() and not list(out.rglob("*.tmp"))
    summary = import_nsd_raw(tiny_raw, out, [1], progress=False)  # complete: nothing read or rewritten
    assert reads == [] and first.stat().st_mtime_ns == mtime and summary["subj01"]["sessions"] == 3
    with pytest.raises(DataFormatError, match="other options"):
        import_nsd_raw(tiny_raw, out, [1], normalise="train", progress=False)


def test_hdf5_betas_and_a_custom_mask(tiny_raw, tmp_path):
    """NSD's ``betas_sessionNN.hdf5`` ((T, Z, Y, X)) imports exactly like the NIfTI files; ``--mask`` picks the
    voxels > 0 of any volume on the grid."""
    import h5py

    import_nsd_raw(tiny_raw, tmp_path / "nifti", [1], progress=False)
    for s in (1, 2, 3):
        path = _betas(tiny_raw, s)
        volume = np.asarray(nib.load(path).dataobj)
        with h5py.File(path.with_name(f"betas_session{s:02d}.hdf5"), "w") as h5:
            h5.create_dataset("betas", data=volume.transpose(3, 2, 1, 0))
        path.unlink()
    import_nsd_raw(tiny_raw, tmp_path / "hdf5", [1], progress=False)
    assert _shards(tmp_path / "hdf5" / "subj01") == _shards(tmp_path / "nifti" / "subj01")

    roi = tiny_raw / "nsddata" / "ppdata" / "subj01" / "func1pt8mm" / "roi" / "prf-visualrois.nii.gz"
    import_nsd_raw(tiny_raw, tmp_path / "masked", [1], mask=str(roi), progress=False)
    meta = json.loads((tmp_path / "masked" / "subj01" / "meta.json").read_text())
    assert meta["num_voxels"] == int((np.asarray(nib.load(roi).dataobj) > 0).sum())
    assert meta["nsd_raw"]["mask"] == str(roi)


def test_interpretability_reads_a_raw_import_in_subject_space_with_nsd_roi_names(layouts, tmp_path):
    """The analyses' ROI loader finds the imported voxel mask (so voxel maps are also written as NIfTI on the
    subject's grid) and the NSD ROI names (so enrichment tables name FFA-1, PPA, ...)."""
    from types import SimpleNamespace

    from experiments.interpretability.loading import load_roi_info
    from experiments.interpretability.voxel_maps import roi_enrichment, to_volume

    data, raw_root, _ = layouts
    import_nsd_raw(raw_root, tmp_path, [2], progress=False)
    meta = json.loads((tmp_path / "subj02" / "meta.json").read_text())
    run = SimpleNamespace(datamodule=SimpleNamespace(metas={"subj02": meta}, data_dir=str(tmp_path)))
    roi = load_roi_info(run, "subj02")
    model = data.subjects["subj02"]
    assert roi.mask is not None and np.allclose(roi.affine, grid_affine(model.volume_shape))
    values = np.arange(1, model.num_voxels + 1, dtype=np.float32)[None]
    volume = to_volume(values, roi)[..., 0]
    assert np.array_equal(volume.reshape(-1)[model.mask_flat_index], values[0])  # voxel v at its own position
    assert volume.sum() == values.sum()
    ffa = (np.asarray(roi.names)[roi.labels] == "FFA-1").astype(np.float32)
    enrichment = roi_enrichment(ffa[None] + 0.01, roi.labels, roi.names)
    assert roi.names[int(enrichment[0].argmax())] == "FFA-1"

    # slices over the subject's mean volume with ROI outlines (nilearn)
    from PIL import Image

    from experiments.interpretability.slices import slice_figure
    mean = np.asarray(nib.load(tmp_path / "subj02" / "mean.nii.gz").dataobj)
    assert roi.background is not None and np.array_equal(roi.background, mean)
    plain = slice_figure(values[0], roi.mask, roi.affine, tmp_path / "plain.png", "map", background=roi.background)
    outlined = slice_figure(values[0], roi.mask, roi.affine, tmp_path / "outlined.png", "map",
                            background=roi.background, roi_labels=roi.labels, roi_names=roi.names)
    a, b = (np.asarray(Image.open(p).convert("RGB")) for p in (plain, outlined))
    assert a.shape == b.shape and a.shape[0] > 100 and len(np.unique(a.reshape(-1, 3), axis=0)) > 20
    assert (np.abs(a.astype(int) - b.astype(int)).sum(-1) > 60).sum() > 50  # the outlines are drawn


def test_door_success_and_the_datamodule_reads_the_import(tiny_raw, tmp_path, capsys):
    from datamodules import NSDDataModule

    out = tmp_path / "out"
    status = run_main(prepare_main, ["--nsd-root", str(tiny_raw), "--out", str(out), "--subjects", "1",
                                     "--normalise", "train", "--quiet"])
    text = capsys.readouterr().out
    assert status == 0 and "subj01" in text and "z-score per train" in text
    dm = NSDDataModule(str(out), subjects=["subj01"], batch_size=4, eval_batch_size=2, num_workers=0,
                       val_images=3, val_cache_dir=str(tmp_path / "val_cache"), shuffle_buffer=10,
                       shuffle_initial=4)
    dm.prepare_data()
    dm.setup("fit")
    batch, _, _ = next(iter(dm.train_dataloader()))
    assert batch["subj01"]["voxels"].shape == (4, TINY.voxels[0])
    dm.setup("test")
    test = next(iter(dm.test_dataloader()[0]))
    assert test["voxels"].shape[1:] == (TINY.repeats, TINY.voxels[0]) and test["repeat_mask"].all()


def test_make_synthetic_nsd_writes_the_raw_layout_consistent_with_the_others(tmp_path, capsys):
    from experiments.make_synthetic_nsd import main

    args = ["--voxels", "40", "50", "--sessions", "2", "--trials-per-session", "30", "--test-images", "5",
            "--image-size", "16"]
    assert main(["--out", str(tmp_path / "ours"), "--nsd-raw-layout", str(tmp_path / "raw"), *args]) == 0
    assert "raw layout" in capsys.readouterr().out
    import_nsd_raw(tmp_path / "raw", tmp_path / "imported", [1, 2], normalise="train", progress=False)
    for name in ("subj01", "subj02"):
        ours = json.loads((tmp_path / "ours" / name / "meta.json").read_text())
        raw = json.loads((tmp_path / "imported" / name / "meta.json").read_text())
        assert [s["nsd_ids"] for s in ours["sessions"]] == [s["nsd_ids"] for s in raw["sessions"]]


def test_responses_tsv_gives_the_same_trials_and_its_count_is_checked(tiny_raw, tmp_path, capsys):
    import_nsd_raw(tiny_raw, tmp_path / "mat", [1], progress=False)
    import_nsd_raw(tiny_raw, tmp_path / "tsv", [1], design="responses", progress=False)
    assert _shards(tmp_path / "tsv" / "subj01") == _shards(tmp_path / "mat" / "subj01")
    meta = json.loads((tmp_path / "tsv" / "subj01" / "meta.json").read_text())
    assert meta["nsd_raw"]["design"].endswith("responses.tsv") and "design=responses" in meta["provenance"]["source"]
    path = tiny_raw / "nsddata" / "ppdata" / "subj01" / "behav" / "responses.tsv"
    lines = path.read_text().splitlines()
    session2 = next(i for i, line in enumerate(lines) if line.split("\t")[1] == "2")
    path.write_text("\n".join(lines[:session2] + lines[session2 + 1:]) + "\n")
    status = run_main(prepare_main, ["--nsd-root", str(tiny_raw), "--out", str(tmp_path / "bad"), "--subjects",
                                     "1", "--design", "responses", "--quiet"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1
    assert "betas_session02.nii.gz holds 30 trials; " in err and "responses.tsv lists 29 for session 2" in err


def test_voxel_maps_command_on_a_raw_import_writes_slices_and_nsd_roi_tables(layouts, small_data, targets,
                                                                             stage1_checkpoints, tmp_path):
    """``python -m experiments.interpret voxel-maps`` on raw-imported subjects: NIfTI maps, slices over the mean
    volume with ROI outlines in the report, enrichment tables with NSD's ROI names."""
    from pathlib import Path

    from experiments.interpret import main as interpret_main

    _, raw_root, mindeye2_root = layouts
    data = tmp_path / "data"
    import_nsd_raw(raw_root, data, [1, 2, 3], normalise="train", captions=mindeye2_root / "coco_captions.json",
                   progress=False)
    (data / "targets").symlink_to(targets, target_is_directory=True)
    repo = Path(__file__).resolve().parent.parent
    out = tmp_path / "interpret"
    status = run_main(interpret_main, [
        "voxel-maps", "--out", str(out), "--config", str(repo / "configs/base/trainer.yaml"),
        "--config", str(repo / "configs/stage1/tiny_synthetic.yaml"), "--ckpt", str(stage1_checkpoints["text"]),
        f"--data.init_args.data_dir={data}", "--max-images", "8", "--steps", "4", "--permutations", "50"])
    assert status == 0
    assert (out / "voxel_maps" / "ig_model.nii.gz").is_file()
    assert (out / "voxel_maps" / "ig_model_slices.png").is_file()
    assert "voxel_maps/ig_model_slices.png" in (out / "report.html").read_text()
    header = (out / "voxel_maps" / "roi_enrichment_ig_level0.csv").read_text().splitlines()[0].split(",")
    assert {"FFA-1", "PPA", "EBA", "V1v", "hV4", "none"} <= set(header)
