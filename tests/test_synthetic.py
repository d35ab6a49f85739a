"""The synthetic dataset: deterministic, NSD-like reliability, planted ROIs and factors as stated."""

from __future__ import annotations

import numpy as np

from datamodules.synthetic import (
    CATEGORIES,
    COLOURS,
    OBJECT_WORDS,
    ROI_NAMES,
    SyntheticNSDConfig,
    generate,
    simulate,
    split_half_reliability,
)
from tests.conftest import SMALL


def test_simulation_is_deterministic_by_seed():
    a, b = simulate(SMALL), simulate(SMALL)
    c = simulate(SyntheticNSDConfig(**{**SMALL.__dict__, "seed": SMALL.seed + 1}))
    assert np.array_equal(a.images, b.images)
    for name in a.raw_betas:
        assert np.array_equal(a.raw_betas[name], b.raw_betas[name])
        assert not np.allclose(a.raw_betas[name], c.raw_betas[name])


def test_written_shards_are_byte_identical_across_runs(tmp_path, small_sim):
    generate(SMALL, tmp_path / "a", small_sim)
    generate(SMALL, tmp_path / "b", simulate(SMALL))
    shards = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.tar"))
    assert len(shards) == 3 * (SMALL.num_sessions + 1)
    for rel in shards:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_subjects_differ_in_voxel_count_and_roi_placement(small_sim):
    models = list(small_sim.subjects.values())
    assert [m.num_voxels for m in models] == list(SMALL.voxels)
    for m in models:
        assert set(np.unique(m.roi)) == set(range(len(ROI_NAMES)))  # every ROI type in every subject
    # ROI placement is subject-specific: the fraction of low-level voxels among the first voxels differs.
    first = [np.mean(m.roi[:100] == ROI_NAMES.index("low_level")) for m in models]
    assert len(set(np.round(first, 2))) > 1


def test_test_images_are_shared_and_repeated(small_sim):
    for table in small_sim.trials.values():
        ids, counts = np.unique(table.nsd_id[table.is_test], return_counts=True)
        assert np.array_equal(ids, small_sim.test_ids)
        assert (counts == SMALL.repeats).all()
        # repeats fall in more than one session for most images
        sessions = [len(set(table.session[table.nsd_id == i])) for i in ids]
        assert np.mean(np.array(sessions) > 1) > 0.5
    train_sets = [set(t.nsd_id[~t.is_test]) for t in small_sim.trials.values()]
    assert not train_sets[0] & train_sets[1]  # training images are subject-specific, as in NSD


def test_reliability_matches_the_stated_nsd_like_range(small_sim):
    """Split-half correlation of repeats: 0.3-0.5 for responsive voxels (the README's statement)."""
    for name, model in small_sim.subjects.items():
        rel = split_half_reliability(small_sim.raw_betas[name], small_sim.trials[name])
        responsive = model.roi != ROI_NAMES.index("unresponsive")
        assert 0.35 <= np.median(rel[responsive]) <= 0.45, name
        assert abs(np.median(rel[~responsive])) < 0.1
        # independent check of the estimator on one voxel with a plain loop
        table, betas = small_sim.trials[name], small_sim.raw_betas[name]
        v = int(np.flatnonzero(responsive)[0])
        first, second = [], []
        for i in np.unique(table.nsd_id):
            rows = np.sort(table.global_trial[table.nsd_id == i])
            if len(rows) >= 2:
                first.append(betas[rows[0], v])
                second.append(betas[rows[1], v])
        assert np.isclose(np.corrcoef(first, second)[0, 1], rel[v], atol=1e-5)


def test_captions_and_categories_describe_the_factors(small_sim):
    captions, categories = small_sim.captions(), small_sim.categories()
    f = small_sim.factors
    for i in range(0, len(small_sim.images), 7):
        assert categories[i] == [CATEGORIES[f.category[i]]]
        assert len(captions[i]) == SMALL.captions_per_image
        for text in captions[i]:
            assert OBJECT_WORDS[f.category[i]] in text
            assert list(COLOURS)[f.colour[i]] in text


def test_category_selective_voxels_prefer_their_category(small_sim):
    for name, model in small_sim.subjects.items():
        table, betas = small_sim.trials[name], small_sim.raw_betas[name]
        z = (betas - betas.mean(0)) / betas.std(0)
        category = small_sim.factors.category[table.nsd_id]
        for k, cat in enumerate(CATEGORIES):
            vox = model.roi == ROI_NAMES.index(f"category_{cat}")
            mean_by_cat = [z[category == c][:, vox].mean() for c in range(len(CATEGORIES))]
            assert int(np.argmax(mean_by_cat)) == k, (name, cat)


def test_reliability_measured_from_the_shards_matches_the_generator(small_data, small_sim):
    from datamodules.inspection import describe_dataset, split_half_from_shards

    for name in ("subj01", "subj03"):
        from_shards = split_half_from_shards(small_data, name)
        from_memory = split_half_reliability(small_sim.raw_betas[name], small_sim.trials[name])
        assert np.allclose(from_shards, from_memory, atol=5e-3)
    rows = describe_dataset(small_data)
    assert [r["subject"] for r in rows] == ["subj01", "subj02", "subj03"]
    assert all(0.3 <= r["median_split_half_responsive"] <= 0.5 for r in rows)


def test_make_synthetic_nsd_command(tmp_path, capsys):
    from experiments.make_synthetic_nsd import main

    status = main(["--out", str(tmp_path / "ours"), "--mindeye2-layout", str(tmp_path / "me2"), "--voxels", "50",
                   "60", "--sessions", "2", "--trials-per-session", "30", "--test-images", "5",
                   "--image-size", "16"])
    assert status == 0
    assert (tmp_path / "ours" / "subj02" / "meta.json").exists()
    assert (tmp_path / "me2" / "wds" / "subj02" / "new_test" / "0.tar").exists()
    assert "subj01, subj02" in capsys.readouterr().out
