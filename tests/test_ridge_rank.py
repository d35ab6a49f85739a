"""Reduced-rank ridge (the linear decoder through a width-b bottleneck) against sklearn and the rank it promises."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import Ridge

from experiments.baselines.ridge import RankedRidge


@pytest.fixture
def planted():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 40))
    y = x @ rng.normal(size=(40, 12)) + 0.5 * rng.normal(size=(300, 12)) + 3.0  # full-rank signal, offset
    return x, y


def test_full_rank_is_sklearn_ridge(planted):
    x, y = planted
    np.testing.assert_allclose(RankedRidge(10.0).fit(x, y).predict(x), Ridge(alpha=10.0).fit(x, y).predict(x),
                               atol=1e-9)
    np.testing.assert_allclose(RankedRidge(10.0, rank=12).fit(x, y).predict(x),
                               Ridge(alpha=10.0).fit(x, y).predict(x), atol=1e-9)


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_predictions_span_rank_directions_and_lose_signal(planted, rank):
    x, y = planted
    pred = RankedRidge(10.0, rank).fit(x, y).predict(x)
    assert np.linalg.matrix_rank(pred - pred.mean(0), tol=1e-6) == rank
    np.testing.assert_allclose(pred.mean(0), y.mean(0), atol=1e-9)  # the intercept keeps the targets' mean
    full = RankedRidge(10.0).fit(x, y).predict(x)
    assert ((pred - y) ** 2).mean() > ((full - y) ** 2).mean()  # a width-b decoder cannot carry all 12 dims
