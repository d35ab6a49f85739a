"""MindEyeV2 importer: exact round trip on a generated release layout, resumability, and every bad input."""

from __future__ import annotations

import io
import json
import tarfile

import h5py
import numpy as np
import pytest

from datamodules.common import DataFormatError
from datamodules.mindeye2_import import import_mindeye2, read_behav
from datamodules.shard_format import decode_sample, read_tar_members
from experiments._cli import run_main
from experiments.prepare_nsd import main as prepare_main
from tests.conftest import SMALL, tiny_mindeye2


def read_shard(path):
    """Decoded samples of one of our shards, in file order (read with tarfile, independently of the loaders)."""
    members = read_tar_members(path)
    keys = list(dict.fromkeys(name.split(".", 1)[0] for name in members))
    return [decode_sample({"__key__": k, **{n.split(".", 1)[1]: v for n, v in members.items()
                                             if n.split(".", 1)[0] == k}}) for k in keys]


@pytest.fixture(scope="module")
def imported(tmp_path_factory, small_mindeye2):
    out = tmp_path_factory.mktemp("imported")
    summary = import_mindeye2(small_mindeye2, out, [1, 2, 3], coco_categories=small_mindeye2 / "coco_categories.json",
                              roi_mask_pattern=str(small_mindeye2 / "roi" / "{subject}" / "nsdgeneral.nii.gz"),
                              progress=False)
    return out, summary


def test_round_trip_every_voxel_row_and_image(imported, small_mindeye2):
    out, summary = imported
    with h5py.File(small_mindeye2 / "coco_images_224_float16.hdf5") as f:
        images = f["images"][:]
    captions = json.loads((small_mindeye2 / "coco_captions.json").read_text())
    for name in ("subj01", "subj02", "subj03"):
        with h5py.File(small_mindeye2 / f"betas_all_{name}_fp32_renorm.hdf5") as f:
            betas = f["betas"][:]
        n_train = 0
        for k in range(SMALL.num_sessions):
            behav = read_behav(small_mindeye2 / "wds" / name / "train" / f"{k}.tar")
            samples = read_shard(out / name / "train" / f"session-{k + 1:02d}.tar")
            assert len(samples) == len(behav)
            by_row = {int(b[5]): b for b in behav}
            for s in samples:
                info = s["info"]
                b = by_row[info["global_trial"]]
                assert info["nsd_id"] == int(b[0]) and info["session"] == int(b[2]) == k + 1
                assert np.array_equal(s["voxels"], betas[info["global_trial"]].astype(np.float16))
                source_image = np.round(images[info["nsd_id"]].astype(np.float32).transpose(1, 2, 0) * 255)
                assert np.array_equal(s["image"], source_image.astype(np.uint8))
                assert info["captions"] == captions[str(info["nsd_id"])]
                assert len(info["categories"]) == 1
            n_train += len(samples)
        assert summary[name]["train_trials"] == n_train

        # test repeats grouped: one sample per image, all its new_test trials, ascending nsd_id
        test_behav = read_behav(small_mindeye2 / "wds" / name / "new_test" / "0.tar")
        samples = [s for p in sorted((out / name / "test").glob("*.tar")) for s in read_shard(p)]
        ids = [s["info"]["nsd_id"] for s in samples]
        assert ids == sorted(set(test_behav[:, 0].astype(int).tolist()))
        for s in samples:
            rows = sorted(int(r) for r in test_behav[test_behav[:, 0] == s["info"]["nsd_id"], 5])
            assert s["info"]["global_trials"] == rows
            assert np.array_equal(s["voxels"], betas[rows].astype(np.float16))
        meta = json.loads((out / name / "meta.json").read_text())
        assert meta["normalisation"]["kind"] == "mindeye2_release"
        assert meta["roi_mask"] == "nsdgeneral.nii.gz" and (out / name / "nsdgeneral.nii.gz").exists()
        assert meta["provenance"]["format_version"] == 1 and "git_commit" in meta["provenance"]


def test_import_matches_the_directly_written_format(imported, small_data):
    out, _ = imported
    for name in ("subj01", "subj02"):
        direct = json.loads((small_data / name / "meta.json").read_text())
        via = json.loads((out / name / "meta.json").read_text())
        assert [s["nsd_ids"] for s in direct["sessions"]] == [s["nsd_ids"] for s in via["sessions"]]
        a = read_shard(small_data / name / "train" / "session-02.tar")
        b = read_shard(out / name / "train" / "session-02.tar")
        assert all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, b))
        assert all(np.allclose(x["voxels"], y["voxels"], atol=2e-2) for x, y in zip(a, b))


def test_sessions_and_renormalise(tmp_path, small_mindeye2):
    summary = import_mindeye2(small_mindeye2, tmp_path, ["subj02"], sessions=2, renormalise=True, progress=False)
    assert summary["subj02"]["sessions"] == 2
    assert sorted(p.name for p in (tmp_path / "subj02" / "train").iterdir()) == ["session-01.tar", "session-02.tar"]
    with h5py.File(small_mindeye2 / "betas_all_subj02_fp32_renorm.hdf5") as f:
        betas = f["betas"][:].astype(np.float64)
    rows = []
    for k in range(2):
        rows += [int(b[5]) for b in read_behav(small_mindeye2 / "wds" / "subj02" / "train" / f"{k}.tar")]
    mean, std = betas[rows].mean(0), betas[rows].std(0)  # training trials of the imported sessions only
    stats = np.load(tmp_path / "subj02" / "norm_stats.npz")
    assert np.allclose(stats["mean"], mean, atol=1e-5) and np.allclose(stats["std"], std, atol=1e-5)
    sample = read_shard(tmp_path / "subj02" / "test" / "test-000000.tar")[0]
    expected = ((betas[sample["info"]["global_trials"]] - mean) / std).astype(np.float16)
    assert np.allclose(sample["voxels"].astype(np.float32), expected.astype(np.float32), atol=2e-3)
    meta = json.loads((tmp_path / "subj02" / "meta.json").read_text())
    assert meta["normalisation"]["kind"] == "zscore_train"
    assert meta["test"]["num_images"] == SMALL.num_test_images  # the test set is always complete


def test_fewer_sessions_keep_the_test_trials_positions_within_their_sessions(tmp_path, imported, small_mindeye2):
    """With --sessions 1 the test trials of later sessions still carry their true within-session position."""
    import_mindeye2(small_mindeye2, tmp_path, ["subj01"], sessions=1, progress=False)

    def positions(root):
        out = {}
        for shard in sorted((root / "subj01" / "test").glob("*.tar")):
            for sample in read_shard(shard):
                info = sample["info"]
                out.update(zip(info["global_trials"], zip(info["sessions"], info["trials"])))
        return out

    full, fewer = positions(imported[0]), positions(tmp_path)
    assert fewer == full and len({s for s, _ in fewer.values()}) > 1  # later sessions' test trials included


def test_resume_skips_finished_shards_and_redoes_half_written_ones(tmp_path):
    src = tiny_mindeye2(tmp_path / "src")
    out = tmp_path / "out"
    import_mindeye2(src, out, [1], progress=False)
    shard = out / "subj01" / "train" / "session-02.tar"
    original = shard.read_bytes()
    untouched = out / "subj01" / "train" / "session-01.tar"
    mtime = untouched.stat().st_mtime_ns
    shard.unlink()
    (out / "subj01" / "meta.json").unlink()
    stale = shard.with_name(".session-02.tar.999.tmp")
    stale.write_bytes(original[:100])
    import_mindeye2(src, out, [1], progress=False)
    assert shard.read_bytes() == original
    assert untouched.stat().st_mtime_ns == mtime  # finished shard skipped
    assert not stale.exists()
    with pytest.raises(DataFormatError, match="other options"):
        import_mindeye2(src, out, [1], renormalise=True, progress=False)


def _corrupt_missing_betas(src):
    (src / "betas_all_subj01_fp32_renorm.hdf5").unlink()
    return "betas_all_subj01_fp32_renorm.hdf5"


def _corrupt_missing_dataset(src):
    path = src / "betas_all_subj01_fp32_renorm.hdf5"
    with h5py.File(path, "a") as f:
        f.move("betas", "other")
    return "'betas'"


def _corrupt_voxel_count(src):
    layout = json.loads((src / "synthetic_layout.json").read_text())
    layout["voxels"]["subj01"] = 65
    (src / "synthetic_layout.json").write_text(json.dumps(layout))
    return "voxel count mismatch"


def _rewrite_behav(src, column, value):
    path = src / "wds" / "subj01" / "train" / "1.tar"
    members = read_tar_members(path)
    name = sorted(n for n in members if n.endswith(".behav.npy"))[3]
    behav = np.load(io.BytesIO(members[name]))
    behav[0, column] = value
    buf = io.BytesIO()
    np.save(buf, behav)
    members[name] = buf.getvalue()
    with tarfile.open(path, "w") as tar:
        for n, data in members.items():
            info = tarfile.TarInfo(n)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return "1.tar"


def _corrupt_index(src):
    _rewrite_behav(src, 0, 10**6)
    return "column 0"


def _corrupt_row(src):
    _rewrite_behav(src, 5, 10**6)
    return "column 5"


def _corrupt_nan(src):
    behav = read_behav(src / "wds" / "subj01" / "train" / "1.tar")
    with h5py.File(src / "betas_all_subj01_fp32_renorm.hdf5", "a") as f:
        f["betas"][int(behav[4, 5]), 7] = np.nan
    return f"row {int(behav[4, 5])}"


def _corrupt_truncated(src):
    path = src / "wds" / "subj01" / "train" / "1.tar"
    path.write_bytes(path.read_bytes()[:3000])
    return "1.tar"


@pytest.mark.parametrize("corrupt", [_corrupt_missing_betas, _corrupt_missing_dataset, _corrupt_voxel_count,
                                     _corrupt_index, _corrupt_row, _corrupt_nan, _corrupt_truncated],
                         ids=lambda f: f.__name__.removeprefix("_corrupt_"))
def test_bad_input_gives_a_clear_error_and_nothing_half_written(tmp_path, capsys, corrupt):
    src = tiny_mindeye2(tmp_path / "src")
    expected = corrupt(src)
    out = tmp_path / "out"
    status = run_main(prepare_main, ["--mindeye2-root", str(src), "--out", str(out), "--subjects", "1", "--quiet"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("error: ") and expected in err, err
    assert not (out / "subj01" / "meta.json").exists()
    assert not list(out.rglob("*.tmp"))
