"""Estimators with intervals for two independent samples: quantiles, shifts, rate differences.

The live judges' statistics, apart from any gate or policy: numbers in, numbers out, so each
can be checked against a brute-force or published value on its own.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from canaryflow.stats.proportions import wilson_interval

Floats = npt.NDArray[np.float64]


def nearest_rank(sorted_values: Floats, q: float) -> float:
    """The q-quantile as the ceil(q*n)-th smallest value (the bootstrap below uses this too)."""
    rank = max(1, math.ceil(q * len(sorted_values)))
    return float(sorted_values[rank - 1])


def bootstrap_quantile(
    sorted_values: Floats, q: float, resamples: int, rng: np.random.Generator
) -> Floats:
    """Bootstrap draws of the nearest-rank quantile in O(resamples), without resampling arrays.

    The k-th smallest of n resampled indices is floor(n * U) with U ~ Beta(k, n - k + 1) (the
    k-th order statistic of n uniforms), so one Beta draw per resample is an exact bootstrap.
    """
    n = len(sorted_values)
    k = max(1, math.ceil(q * n))
    index = np.minimum((n * rng.beta(k, n - k + 1, size=resamples)).astype(np.int64), n - 1)
    return sorted_values[index]


def pairwise_difference_rank(x_sorted: Floats, y_sorted: Floats, rank: float) -> float:
    """The rank-th smallest of all m*n differences y - x, by bisection on counts (no m*n array)."""
    lo = float(y_sorted[0] - x_sorted[-1])
    hi = float(y_sorted[-1] - x_sorted[0])
    m = len(x_sorted)
    for _ in range(100):
        mid = (lo + hi) / 2.0
        if mid in (lo, hi):
            break
        # pairs with y - x <= mid, i.e. x >= y - mid
        count = int(m * len(y_sorted) - np.searchsorted(x_sorted, y_sorted - mid, "left").sum())
        if count >= rank:
            hi = mid
        else:
            lo = mid
    return hi


def hodges_lehmann(x: Floats, y: Floats, z: float) -> tuple[float, float, float]:
    """Shift y - x (median of pairwise differences) with the Moses distribution-free interval."""
    xs, ys = np.sort(x), np.sort(y)
    mn = len(xs) * len(ys)
    mid = (mn + 1) / 2.0
    shift = (
        pairwise_difference_rank(xs, ys, math.floor(mid))
        + pairwise_difference_rank(xs, ys, math.ceil(mid))
    ) / 2.0
    c = max(1, math.floor(mn / 2.0 - z * math.sqrt(mn * (len(xs) + len(ys) + 1) / 12.0)))
    return (
        shift,
        pairwise_difference_rank(xs, ys, c),
        pairwise_difference_rank(xs, ys, mn + 1 - c),
    )


def newcombe_interval(k1: int, n1: int, k2: int, n2: int, confidence: float) -> tuple[float, float]:
    """Newcombe's hybrid score interval (method 10) for p1 - p2, from two Wilson intervals."""
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson_interval(k1, n1, confidence)
    l2, u2 = wilson_interval(k2, n2, confidence)
    d = p1 - p2
    return (
        d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2),
        d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2),
    )
