"""Estimators against brute force and published values."""

from __future__ import annotations

import numpy as np
import pytest

from canaryflow.stats.estimators import (
    bootstrap_quantile,
    hodges_lehmann,
    nearest_rank,
    newcombe_interval,
)


def test_bootstrap_quantile_matches_resampling_by_brute_force() -> None:
    values = np.sort(np.random.default_rng(3).lognormal(0.0, 1.0, 150))
    fast = bootstrap_quantile(values, 0.95, 20_000, np.random.default_rng(4))
    draws = np.random.default_rng(5).integers(0, 150, size=(20_000, 150))
    slow = np.array([nearest_rank(np.sort(values[row]), 0.95) for row in draws])
    for q in (0.05, 0.5, 0.95):
        assert np.quantile(fast, q) == pytest.approx(np.quantile(slow, q), rel=0.02)


def test_hodges_lehmann_is_the_median_of_pairwise_differences() -> None:
    x = np.array([1.0, 4.0, 2.5, 7.0, 3.0, 9.5, 0.5])
    y = np.array([3.0, 8.0, 5.5, 6.0, 12.0, 4.0])
    shift, lo, hi = hodges_lehmann(x, y, 1.96)
    assert shift == pytest.approx(np.median(np.subtract.outer(y, x)))
    assert lo <= shift <= hi


def test_newcombe_interval_matches_the_published_example() -> None:
    # Newcombe (1998), method 10: 56/70 vs 48/80 -> 0.0524 to 0.3339
    lo, hi = newcombe_interval(56, 70, 48, 80, 0.95)
    assert (lo, hi) == (pytest.approx(0.0524, abs=1e-4), pytest.approx(0.3339, abs=1e-4))
