"""The spatial positive control's statistic on routing built here: planted object routing is detected, routing
with no link to the object is not (its p-values are calibrated), and the object cells come from the planted
factors the generator drew."""

from __future__ import annotations

import numpy as np
import pytest

from datamodules.synthetic import SyntheticNSDConfig, object_masks, simulate, universe_factors
from experiments.studies import spatial_control as sc

N, S, G, E = 40, 4, 16, 4
RETINOTOPIC = np.array([True, False, True, False])


def _coverage(rng: np.random.Generator, n: int = N) -> np.ndarray:
    """Objects of 1-4 cells, central cells more often (as the world's objects), in a 4 x 4 grid."""
    coverage = np.zeros((n, G))
    for i in range(n):
        r, c = rng.integers(1, 3, 2)
        h, w = rng.integers(1, 3, 2)
        grid = np.zeros((4, 4))
        grid[r:r + h, c:c + w] = rng.uniform(0.3, 1.0, (min(h, 4 - r), min(w, 4 - c)))
        coverage[i] = grid.ravel()
    return coverage


def _test(maps, coverage, groups, permutations=500, seed=0):
    perms = sc.permutations(groups, permutations, seed)
    return sc.control_test(sc.retinotopic_mass(maps, RETINOTOPIC), sc.contrasts(coverage), perms,
                           sc.step_bins(maps.shape[1], 2))


def test_contrasts_weigh_the_object_against_the_background_and_sum_to_zero():
    coverage = np.array([[1.0, 0.5, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    k = sc.contrasts(coverage)
    np.testing.assert_allclose(k[0], [2 / 3, 1 / 3, -0.5, -0.5])
    np.testing.assert_allclose(k[1], 0.0)  # no background: no contrast
    np.testing.assert_allclose(k.sum(1), 0.0, atol=1e-12)


def test_permutations_move_images_only_within_their_subject():
    groups = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    perms = sc.permutations(groups, 50, 3)
    assert (groups[perms] == groups).all()
    assert all(sorted(p) == list(range(len(groups))) for p in perms)
    np.testing.assert_array_equal(perms, sc.permutations(groups, 50, 3))  # seeded


def test_planted_object_routing_is_detected_and_random_routing_is_not():
    rng = np.random.default_rng(0)
    coverage, groups = _coverage(rng), np.repeat([0, 1], N // 2)
    bias = rng.normal(0, 1, (S, G, E))  # fixed preferences per step and cell, the same for every image
    base = sc.random_routing(rng, (N, S, G, E), bias)
    planted = _test(sc.planted_routing(base, coverage, RETINOTOPIC, 0.3), coverage, groups)
    assert planted.observed_all > 0 and planted.p_all <= 0.01 and planted.z_all > 3, planted.z_all
    assert (planted.p <= 0.01).all()
    # the same object routing toward the *other* experts is not a positive result
    away = _test(sc.planted_routing(base, coverage, ~RETINOTOPIC, 0.3), coverage, groups)
    assert away.observed_all < 0 and away.p_all > 0.5


def test_the_null_is_calibrated_on_routing_with_no_link_to_the_object():
    """Exchangeability makes every p-value uniform under the null: 200 datasets, false-positive rate near 5%
    (binomial sd 1.5 points; the bounds are 4 sd), and a fixed cell bias shared by the objects does not help."""
    rng = np.random.default_rng(1)
    coverage, groups = _coverage(rng), np.repeat([0, 1], N // 2)
    bias = np.zeros((S, G, E))
    bias[:, [5, 6, 9, 10], :2] = 2.0  # central cells (where the objects lie) prefer a retinotopic expert
    p = np.array([_test(sc.random_routing(rng, (N, S, G, E), bias), coverage, groups, 200, seed).p_all
                  for seed in range(200)])
    assert 0.0 <= (p <= 0.05).mean() <= 0.11, (p <= 0.05).mean()
    assert abs(np.median(p) - 0.5) < 0.12, np.median(p)


def test_object_masks_are_the_pixels_the_generator_paints():
    cfg = SyntheticNSDConfig(seed=5, voxels=(20,), num_sessions=2, trials_per_session=30, num_test_images=5,
                             image_size=32)
    sim = simulate(cfg)
    factors = universe_factors(cfg)
    np.testing.assert_array_equal(factors.cx, sim.factors.cx)
    ids = np.arange(len(sim.images))
    masks = object_masks(factors, ids, cfg.image_size)
    grey = sim.images.astype(float).std(-1) < 1e-9  # the background is grey; every object colour is not
    assert masks.any((1, 2)).all()
    np.testing.assert_array_equal(masks, ~grey)


@pytest.mark.parametrize("size, grid", [(32, 4), (30, 4)])
def test_cell_pool_averages_pixels_into_cells(size, grid):
    from experiments.studies.spatial_control_inputs import cell_pool

    pool = cell_pool(size, grid)
    np.testing.assert_allclose(pool.sum(0), 1.0)
    mask = np.zeros((size, size))
    mask[: size // 2, : size // 2] = 1.0
    cover = pool.T @ mask @ pool
    assert cover[0, 0] == 1.0 and cover[-1, -1] == 0.0


def test_the_spatial_control_study_refuses_bad_input_in_one_line(tmp_path, capsys):
    from datamodules.common import run_command
    from experiments.spatial_control_study import main

    assert run_command(main, ["--out", str(tmp_path), "--predict", str(tmp_path / "none")]) == 2
    assert "--predict" in capsys.readouterr().err
    assert run_command(main, ["--out", str(tmp_path), "--permutations", "0"]) == 2
    assert "--permutations" in capsys.readouterr().err
