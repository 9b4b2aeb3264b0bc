"""Statistics for paired pass/fail comparisons (offline evaluation). Pure functions, no I/O.

Candidate and baseline answer the same items, so the comparison is paired: only the discordant
items (one passed, the other failed) carry information about the difference. `b` counts items only
the baseline passed, `c` items only the candidate passed; the difference is (c - b) / n.
"""

from __future__ import annotations

import math

from scipy.optimize import brentq
from scipy.stats import binomtest, norm


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be strictly between 0 and 1, got {confidence}")
    return float(norm.ppf(0.5 + confidence / 2))


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials; (0, 1) when there are no trials.

    Chosen over the normal approximation because it stays inside [0, 1] and behaves at k = 0 or n.
    """
    if n < 0 or not 0 <= k <= max(n, 0):
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return (0.0, 1.0)
    z = _z(confidence)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # Exact bounds at the edges: rounding would otherwise give 1e-17 instead of 0.
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return (lo, hi)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: a binomial test of b against b + c at one half."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    if b + c == 0:
        return 1.0
    return float(min(1.0, binomtest(min(b, c), b + c, 0.5).pvalue))


def _tango_statistic(delta: float, b: int, c: int, n: int) -> float:
    """Tango's score statistic for H0: difference = delta, with the nuisance parameter (the
    probability of a baseline-only pass) at its maximum likelihood under H0."""
    numerator = c - b - n * delta
    if numerator == 0:
        return 0.0
    w = -(b + c) + (2 * n - c + b) * delta
    q = (math.sqrt(max(0.0, w * w + 8 * n * b * delta * (1 - delta))) - w) / (4 * n)
    variance = n * (2 * q + delta * (1 - delta))
    if variance <= 0:
        return math.copysign(math.inf, numerator)
    return numerator / math.sqrt(variance)


def paired_difference_ci(b: int, c: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Tango's (1998) score interval for (c - b) / n, the candidate minus baseline pass rate.

    Needs only the discordant counts and n, stays inside [-1, 1], and keeps a sensible width when
    there is no discordance (it widens as n shrinks), unlike the Wald interval.
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if b < 0 or c < 0 or b + c > n:
        raise ValueError(f"need b, c >= 0 and b + c <= n, got b={b}, c={c}, n={n}")
    z = _z(confidence)
    estimate = (c - b) / n
    eps = 1e-12
    if estimate <= -1 + eps:
        lo = -1.0
    else:
        lo = brentq(lambda d: _tango_statistic(d, b, c, n) - z, -1 + eps, estimate, xtol=1e-10)
    if estimate >= 1 - eps:
        hi = 1.0
    else:
        hi = brentq(lambda d: _tango_statistic(d, b, c, n) + z, estimate, 1 - eps, xtol=1e-10)
    return (float(lo), float(hi))


def items_to_show_non_inferiority(margin: float, confidence: float = 0.95) -> int | None:
    """Fewest paired items for which even identical answers (no discordance) show non-inferiority
    within `margin`: the Tango bound at b = c = 0 is -z^2 / (n + z^2). None when margin is 0."""
    if margin <= 0:
        return None
    z = _z(confidence)
    return math.ceil(z * z * (1 - margin) / margin)


# Discordance assumed when planning power: 5% of items churn each way and the drop itself adds
# its share (a 5-point drop: 15% discordant). A suite whose answers churn more says so, and its
# observed share is used instead (`assumed_discordance`).
DISCORDANCE_FLOOR = 0.15


def assumed_discordance(b: int, c: int, n: int, floor: float = DISCORDANCE_FLOOR) -> float:
    """The discordant share a power statement assumes: the observed one, never below `floor`, so
    a run whose two models happen to agree does not claim a power it would lose to churn."""
    observed = (b + c) / n if n > 0 else 0.0
    return min(1.0, max(observed, floor))


def detectable_drop(
    n: int, margin: float, alpha: float, discordance: float, power: float = 0.8
) -> float:
    """Smallest true drop in pass rate that the offline gate FAILs with probability `power`.

    The gate fails when the estimate is below -margin and the exact McNemar test (two-sided at
    `alpha`, one-sided at alpha/2) says worse. With the normal approximation of the paired
    difference, sd = sqrt(discordance / n), a drop is detected with `power` when it exceeds
    max(margin, z(1 - alpha/2) * sd) + z(power) * sd. Conservative: the drop's own share of the
    variance (-drop^2 / n) is left out.
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if not 0.0 < discordance <= 1.0:
        raise ValueError(f"discordance must be within (0, 1], got {discordance}")
    sd = math.sqrt(discordance / n)
    threshold = max(margin, _z(1 - alpha) * sd)  # _z is two-sided: z(1 - alpha/2)
    return min(1.0, threshold + float(norm.ppf(power)) * sd)


def items_to_detect(
    drop: float, margin: float, alpha: float, discordance: float, power: float = 0.8
) -> int | None:
    """Fewest paired items for which `detectable_drop` is at most `drop`; None when the margin
    alone is already at or beyond the drop (no number of items can detect it)."""
    if drop <= margin:
        return None
    lo, hi = 1, 1
    while detectable_drop(hi, margin, alpha, discordance, power) > drop:
        lo, hi = hi, 2 * hi
    while lo < hi:
        mid = (lo + hi) // 2
        if detectable_drop(mid, margin, alpha, discordance, power) <= drop:
            hi = mid
        else:
            lo = mid + 1
    return hi
