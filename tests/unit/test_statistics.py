"""Paired statistics on literal counts, cross-checked against scipy and an independent inversion."""

from __future__ import annotations

import math

import pytest
from scipy.optimize import minimize_scalar
from scipy.stats import binomtest, norm

from canaryflow.stats.proportions import (
    items_to_show_non_inferiority,
    mcnemar_exact,
    paired_difference_ci,
    wilson_interval,
)


def test_wilson_interval_known_values() -> None:
    assert wilson_interval(5, 10) == pytest.approx((0.236593, 0.763407), abs=1e-6)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.277533), abs=1e-6)
    assert wilson_interval(10, 10) == pytest.approx((0.722467, 1.0), abs=1e-6)
    # 99%: lower root of (p - x)^2 = z^2 x (1 - x) / n, solved by hand
    assert wilson_interval(97, 100, 0.99)[0] == pytest.approx(0.889125, abs=1e-6)


def test_wilson_interval_without_trials_is_uninformative() -> None:
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_wilson_interval_rejects_impossible_counts() -> None:
    with pytest.raises(ValueError, match="0 <= k <= n"):
        wilson_interval(11, 10)
    with pytest.raises(ValueError, match="confidence"):
        wilson_interval(1, 10, confidence=1.0)


def test_mcnemar_exact_known_value() -> None:
    # 2 * P(X <= 2), X ~ Bin(12, 1/2) = 2 * (1 + 12 + 66) / 4096
    assert mcnemar_exact(10, 2) == pytest.approx(158 / 4096)
    assert mcnemar_exact(2, 10) == pytest.approx(158 / 4096)


@pytest.mark.parametrize(("b", "c"), [(0, 1), (1, 0), (3, 3), (0, 13), (7, 20), (25, 9), (40, 41)])
def test_mcnemar_exact_matches_scipy_binomtest(b: int, c: int) -> None:
    assert mcnemar_exact(b, c) == pytest.approx(binomtest(b, b + c, 0.5).pvalue)


def test_mcnemar_without_discordance_is_one() -> None:
    assert mcnemar_exact(0, 0) == 1.0


def _score_statistic_by_numerical_mle(delta: float, b: int, c: int, n: int) -> float:
    """Tango's statistic with the nuisance parameter found by brute-force maximisation."""

    def negative_loglik(q: float) -> float:
        cells = [(c, q + delta), (b, q), (n - b - c, 1 - 2 * q - delta)]
        return -sum(k * math.log(p) for k, p in cells if k > 0)

    low, high = max(0.0, -delta) + 1e-12, (1 - delta) / 2 - 1e-12
    q = minimize_scalar(
        negative_loglik, bounds=(low, high), method="bounded", options={"xatol": 1e-12}
    ).x
    return (c - b - n * delta) / math.sqrt(n * (2 * q + delta * (1 - delta)))


@pytest.mark.parametrize(("b", "c", "n"), [(7, 1, 21), (16, 6, 161), (13, 0, 100), (20, 40, 160)])
def test_paired_difference_ci_inverts_the_score_test(b: int, c: int, n: int) -> None:
    lo, hi = paired_difference_ci(b, c, n, 0.95)
    z = norm.ppf(0.975)
    assert lo < (c - b) / n < hi
    assert _score_statistic_by_numerical_mle(lo, b, c, n) == pytest.approx(z, abs=1e-4)
    assert _score_statistic_by_numerical_mle(hi, b, c, n) == pytest.approx(-z, abs=1e-4)


def test_paired_difference_ci_known_values() -> None:
    # Bentur et al. (2009) and Cavo et al. (2012), the paired 2x2 examples used by Fagerland,
    # Lydersen and Laake for Tango's interval; our b is their n21, our c their n12.
    assert paired_difference_ci(7, 1, 21) == pytest.approx((-0.5172, -0.0260), abs=1e-4)
    assert paired_difference_ci(16, 6, 161) == pytest.approx((-0.1240, -0.0054), abs=1e-4)


def test_paired_difference_ci_without_discordance_is_centred_and_narrows_with_n() -> None:
    lo20, hi20 = paired_difference_ci(0, 0, 20)
    lo200, hi200 = paired_difference_ci(0, 0, 200)
    assert lo20 == pytest.approx(-hi20) and lo200 == pytest.approx(-hi200)
    z2 = norm.ppf(0.975) ** 2
    assert hi20 == pytest.approx(z2 / (20 + z2))
    assert 0 < hi200 < hi20


def test_paired_difference_ci_at_the_edges() -> None:
    assert paired_difference_ci(0, 20, 20)[1] == 1.0
    assert paired_difference_ci(20, 0, 20)[0] == -1.0


def test_paired_difference_ci_rejects_impossible_counts() -> None:
    with pytest.raises(ValueError, match="b \\+ c <= n"):
        paired_difference_ci(8, 5, 10)


def test_items_to_show_non_inferiority_is_the_first_n_that_can_pass() -> None:
    n = items_to_show_non_inferiority(0.05)
    assert n == 73
    assert paired_difference_ci(0, 0, n)[0] >= -0.05 > paired_difference_ci(0, 0, n - 1)[0]
    assert items_to_show_non_inferiority(0.0) is None
