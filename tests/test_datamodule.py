"""NSDDataModule: batch API, exact epoch lengths per rank and worker, determinism, splits, targets, bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from datamodules import DataFormatError, NSDDataModule
from datamodules.streams import _pad_repeats
from datamodules.target_cache import TargetCache, write_target_cache


def make_dm(root, tmp_path, **kw):
    args = dict(subjects=["subj01"], batch_size=8, eval_batch_size=6, num_workers=0, val_images=10,
                val_cache_dir=str(tmp_path / "val_cache"), shuffle_buffer=50, shuffle_initial=10)
    args.update(kw)
    dm = NSDDataModule(str(root), **args)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def train_ids(dm):
    return [{s: b["nsd_id"].tolist() for s, b in batch.items()} for batch, _, _ in dm.train_dataloader()]


def test_training_batch_api(small_data, tmp_path):
    dm = make_dm(small_data, tmp_path, subjects=["subj01", 3], batch_size={"subj01": 8, "subj03": 5})
    batch, _, _ = next(iter(dm.train_dataloader()))
    assert list(batch) == ["subj01", "subj03"]
    for name, b_s, v_s in (("subj01", 8, 300), ("subj03", 5, 360)):
        sub = batch[name]
        assert sub["subject"] == name
        assert sub["voxels"].shape == (b_s, v_s) and sub["voxels"].dtype == torch.float32
        assert sub["image"].shape == (b_s, 3, 32, 32) and 0 <= sub["image"].min() and sub["image"].max() <= 1
        assert sub["nsd_id"].shape == (b_s,) and sub["nsd_id"].dtype == torch.int64
        assert len(sub["captions"]) == b_s and all(isinstance(c, list) and c for c in sub["captions"])
        assert len(sub["categories"]) == b_s
    assert dm.num_voxels() == {"subj01": 300, "subj03": 360}


@pytest.mark.parametrize("world", [1, 2, 8])
@pytest.mark.parametrize("workers", [0, 2])
def test_every_rank_yields_the_same_number_of_batches(small_data, tmp_path, world, workers):
    """One session, 2 subjects: batches per epoch = samples_per_epoch // (global batch), on every rank."""
    counts = []
    for rank in range(min(world, 2)):
        dm = NSDDataModule(str(small_data), subjects=["subj01", "subj02"], num_sessions=1, batch_size=4,
                           num_workers=workers, val_images=5, samples_per_epoch=400,
                           val_cache_dir=str(tmp_path / "vc"))
        dm.set_rank(rank, world)
        dm.prepare_data()
        dm.setup("fit")
        expected = max(1, 400 // (8 * world))
        assert dm.num_train_batches() == expected
        loader = dm.train_dataloader()
        batches = [b for b, _, _ in loader]
        assert len(batches) == expected == len(loader)
        per_worker = np.bincount([b["subj01"]["worker"] for b in batches], minlength=max(workers, 1))
        assert per_worker.max() - per_worker.min() <= 1
        counts.append(len(batches))
    assert len(set(counts)) == 1


def test_default_epoch_is_one_pass_over_the_training_trials(small_data, tmp_path):
    dm = make_dm(small_data, tmp_path, subjects=["subj01", "subj02"], batch_size=10)
    trials = dm.train_trials("subj01") + dm.train_trials("subj02")
    assert dm.num_train_batches() == trials // 20


def test_training_is_deterministic_and_differs_across_epochs_and_ranks(small_data, tmp_path):
    a = make_dm(small_data, tmp_path)
    b = make_dm(small_data, tmp_path)
    loader_a, loader_b = a.train_dataloader(), b.train_dataloader()
    epoch0_a, epoch0_b = train_ids_from(loader_a), train_ids_from(loader_b)
    assert epoch0_a == epoch0_b
    assert train_ids_from(loader_a) != epoch0_a  # the next epoch reshuffles
    other_rank = make_dm(small_data, tmp_path)
    other_rank.set_rank(1, 2)
    one_rank = make_dm(small_data, tmp_path)
    one_rank.set_rank(0, 2)
    assert train_ids_from(other_rank.train_dataloader()) != train_ids_from(one_rank.train_dataloader())
    reseeded = make_dm(small_data, tmp_path, seed=5)
    assert train_ids_from(reseeded.train_dataloader()) != epoch0_a


def train_ids_from(loader):
    return [b["subj01"]["nsd_id"].tolist() for b, _, _ in loader]


def test_validation_holds_out_whole_images_never_test_images(small_data, tmp_path, small_sim):
    dm = make_dm(small_data, tmp_path, samples_per_epoch=4000)
    val = dm.val_ids("subj01")
    assert len(val) == 10 and val == sorted(val)
    assert not set(val) & set(small_sim.test_ids.tolist())
    seen = {i for batch in train_ids(dm) for i in batch["subj01"]}
    assert not seen & set(val)
    assert len(seen) > 0.9 * (len({i for s in dm.metas["subj01"]["sessions"] for i in s["nsd_ids"]}) - 10)
    batches = list(dm.val_dataloader()[0])
    ids = torch.cat([b["nsd_id"] for b in batches]).tolist()
    assert ids == val
    table = small_sim.trials["subj01"]
    for b in batches:
        assert b["voxels"].shape[1:] == (3, 300) and b["valid"].all()
        for i, nsd_id in enumerate(b["nsd_id"].tolist()):
            assert int(b["repeat_mask"][i].sum()) == int((table.nsd_id == nsd_id).sum())  # every repeat


def test_validation_split_depends_on_seed_and_sessions_only(small_data, tmp_path):
    a = make_dm(small_data, tmp_path)
    assert a.val_ids("subj01") == make_dm(small_data, tmp_path, num_workers=2, batch_size=3).val_ids("subj01")
    assert a.val_ids("subj01") != make_dm(small_data, tmp_path, seed=1).val_ids("subj01")
    fewer = make_dm(small_data, tmp_path, num_sessions=1)
    first = {i for i in fewer.metas["subj01"]["sessions"][0]["nsd_ids"]}
    assert set(fewer.val_ids("subj01")) <= first


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_evaluation_split_by_rank_is_padded_and_complete(small_data, tmp_path, small_sim, world):
    seen, lengths = [], set()
    for rank in range(world):
        dm = make_dm(small_data, tmp_path, num_workers=2 if rank == 0 else 0, eval_batch_size=4)
        dm.set_rank(rank, world)
        loader = dm.test_dataloader()[0]
        batches = list(loader)
        lengths.add(len(batches))
        assert len(batches) == len(loader)
        for b in batches:
            seen += b["nsd_id"][b["valid"]].tolist()
    assert len(lengths) == 1
    assert seen == small_sim.test_ids.tolist()  # ascending, each test image exactly once


def test_test_batches_hold_all_repeats(small_data, tmp_path, small_sim):
    dm = make_dm(small_data, tmp_path)
    batch = next(iter(dm.test_dataloader()[0]))
    table, betas = small_sim.trials["subj01"], small_sim.raw_betas["subj01"]
    stats = np.load(small_data / "subj01" / "norm_stats.npz")
    nsd_id = int(batch["nsd_id"][0])
    rows = np.sort(table.global_trial[table.nsd_id == nsd_id])
    expected = ((betas[rows] - stats["mean"]) / stats["std"]).astype(np.float16).astype(np.float32)
    assert torch.equal(batch["voxels"][0], torch.from_numpy(expected))
    assert batch["repeat_mask"][0].all()
    image = torch.from_numpy(small_sim.images[nsd_id]).permute(2, 0, 1).float() / 255
    assert torch.equal(batch["image"][0], image)


def test_pad_repeats_modes():
    v = np.arange(2 * 4, dtype=np.float32).reshape(2, 4)
    zeros, mask = _pad_repeats(v, 3, "zeros")
    assert np.array_equal(zeros, np.stack([v[0], v[1], np.zeros(4)])) and mask.tolist() == [True, True, False]
    dup, mask = _pad_repeats(v, 3, "duplicate")  # MindEyeV2: two repeats -> the first one again
    assert np.array_equal(dup, np.stack([v[0], v[1], v[0]])) and mask.all()
    dup, _ = _pad_repeats(v[:1], 3, "duplicate")  # one repeat -> three copies
    assert np.array_equal(dup, np.stack([v[0]] * 3))


def test_targets_are_joined_by_nsd_id(small_data, tmp_path):
    ids = np.arange(500)
    values = np.stack([ids * 1.0, -ids * 1.0], 1).astype(np.float32)[:, :, None].repeat(3, 2)  # (N, 2, 3)
    write_target_cache(tmp_path / "clip", ids[::-1], values[::-1], model="tiny-clip", layer="image_embeds")
    dm = make_dm(small_data, tmp_path, targets={"clip_image": str(tmp_path / "clip")},
                 target_shapes={"clip_image": [2, 3]})
    batch, _, _ = next(iter(dm.train_dataloader()))
    sub = batch["subj01"]
    assert sub["clip_image"].shape == (8, 2, 3)
    assert torch.equal(sub["clip_image"][:, 0, 0], sub["nsd_id"].float())
    test = next(iter(dm.test_dataloader()[0]))
    assert torch.equal(test["clip_image"][:, 1, 2], -test["nsd_id"].float())


def test_target_cache_refuses_mismatches(tmp_path):
    write_target_cache(tmp_path / "t", np.array([3, 1, 2]), np.zeros((3, 4)), model="m", layer="l")
    assert TargetCache(tmp_path / "t").ids.tolist() == [1, 2, 3]
    with pytest.raises(DataFormatError, match=r"shape \[4\] but \[5\] is expected"):
        TargetCache(tmp_path / "t", expected_shape=[5])
    with pytest.raises(DataFormatError, match="no entry for nsd_id 7"):
        TargetCache(tmp_path / "t").lookup(np.array([1, 7]))
    meta = json.loads((tmp_path / "t" / "meta.json").read_text())
    (tmp_path / "t" / "meta.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(DataFormatError, match="format_version 99"):
        TargetCache(tmp_path / "t")
    (tmp_path / "t" / "meta.json").write_text(json.dumps({**meta, "shape": [5]}))
    with pytest.raises(DataFormatError, match="values.npy has shape"):
        TargetCache(tmp_path / "t")
    with pytest.raises(DataFormatError, match="no meta.json"):
        TargetCache(tmp_path / "absent")


def test_bad_options_name_the_option(small_data, tmp_path):
    with pytest.raises(DataFormatError, match=r"unknown subject subj09.*subj01"):
        make_dm(small_data, tmp_path, subjects=["subj09"])
    with pytest.raises(DataFormatError, match="num_sessions=9"):
        make_dm(small_data, tmp_path, num_sessions=9)
    with pytest.raises(DataFormatError, match="val_images=1000"):
        make_dm(small_data, tmp_path, val_images=1000)
    with pytest.raises(DataFormatError, match="batch_size has no entry"):
        make_dm(small_data, tmp_path, subjects=[1, 2], batch_size={"subj01": 2})
    with pytest.raises(DataFormatError, match="pad_repeats"):
        make_dm(small_data, tmp_path, pad_repeats="mean")


def test_corrupt_shard_is_named(small_data, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(small_data / "subj01", root / "subj01")
    shard = root / "subj01" / "train" / "session-01.tar"
    shard.write_bytes(shard.read_bytes()[: len(shard.read_bytes()) // 2])
    dm = make_dm(root, tmp_path, num_sessions=1, val_images=0)
    with pytest.raises(DataFormatError, match="session-01.tar"):
        list(dm.train_dataloader())


def test_nan_voxels_in_a_shard_are_named(small_data, tmp_path):
    from datamodules.shard_format import encode_npy, read_tar_members, write_shard

    root = tmp_path / "copy"
    shutil.copytree(small_data / "subj01", root / "subj01")
    shard = root / "subj01" / "test" / "test-000000.tar"
    members = read_tar_members(shard)
    name = next(n for n in members if n.endswith(".voxels.npy"))
    bad = np.full((3, 300), np.nan, np.float16)
    members[name] = encode_npy(bad)
    samples = {}
    for n, data in members.items():
        key, ext = n.split(".", 1)
        samples.setdefault(key, {"__key__": key})[ext] = data
    write_shard(shard, samples.values())
    dm = make_dm(root, tmp_path, val_images=0)
    with pytest.raises(DataFormatError, match=rf"test-000000.tar.*{name.split('.')[0]}.*NaN"):
        list(dm.test_dataloader()[0])


@pytest.mark.parametrize("workers", [0, 2])
def test_epoch_sampling_is_an_exact_pass_with_equal_counts_per_rank(small_data, tmp_path, workers):
    world, seen, counts, orders = 2, [], set(), []
    for rank in range(world):
        dm = NSDDataModule(str(small_data), subjects=["subj01", "subj02"], batch_size=6, num_workers=workers,
                           val_images=5, val_cache_dir=str(tmp_path / "vc"), train_sampling="epoch",
                           shuffle_buffer=20, shuffle_initial=5)
        dm.set_rank(rank, world)
        dm.prepare_data()
        dm.setup("fit")
        loader = dm.train_dataloader()
        batches = [b for b, _, _ in loader]
        counts.add(len(batches))
        assert len(batches) == len(loader) == dm.num_train_batches()
        seen += [(s, t) for b in batches for s, t in zip(b["subj01"]["session"].tolist(), b["subj01"]["trial"].tolist())]
        assert not set(sum((b["subj01"]["nsd_id"].tolist() for b in batches), [])) & set(dm.val_ids("subj01"))
        orders.append([b["subj01"]["nsd_id"].tolist() for b, _, _ in loader])  # the next epoch
        orders.append([b["subj01"]["nsd_id"].tolist() for b in batches])
    assert len(counts) == 1
    assert len(seen) == len(set(seen))  # every trial at most once per epoch, across ranks and workers
    assert len(seen) == world * dm.num_train_batches() * 6
    # only the tail that cannot fill a batch on every rank and worker is dropped
    fewest = min(dm.train_trials(s) for s in dm.subjects)
    assert len(seen) >= fewest - world * max(workers, 1) * 6
    assert orders[0] != orders[1]  # epochs differ


def test_epoch_pass_batch_plan():
    from datamodules.streams import epoch_pass_batches

    total, deals = epoch_pass_batches(num_samples=101, world_size=2, num_workers=2, batch_size=5)
    # rank 0 keeps 51 samples (26 + 25 per worker), rank 1 keeps 50 (25 + 25): 5 + 5 full batches each
    assert total == 10 and deals == [[5, 5], [5, 5]]
    total, deals = epoch_pass_batches(num_samples=23, world_size=2, num_workers=1, batch_size=4)
    assert total == 2 and deals == [[2], [2]]
