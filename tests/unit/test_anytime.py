"""The two-sample e-processes: type-I error under continuous monitoring, power on shifts.

Every simulation has a fixed seed; each bound states its Monte-Carlo margin. The figures in the
docstrings were measured with these seeds. A/A runs look after every window (2,000 streams of
30 windows) at alpha = 0.05, the worst case a gate meets; power runs use the alphas the default
policy gives each test (0.05 split across 7 live gates, then 3/4 of a rate gate's share to the
relative test and 1/2 of a latency gate's to each of its two tests).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from canaryflow.stats.anytime import (
    PRIOR_PRECISION,
    SHARE_THETAS,
    SHARE_WEIGHTS,
    TAIL_QUANTILE,
    RankState,
    ShareState,
    mann_whitney_z,
    normal_mixture_log_e,
    upper_tail_counts,
    window_log_lr,
)

ALPHA = 0.05
STREAMS, WINDOWS = 2000, 30
# Binomial sd of a rejection share near 0.05 over 2,000 streams is 0.0049: two of them.
MC_MARGIN = 0.01
GATE_ALPHA = 0.05 / 7  # the default policy's seven live gates
RELATIVE_ALPHA = 0.75 * GATE_ALPHA
LATENCY_ALPHA = 0.5 * GATE_ALPHA
# A 5% canary of 100 req/s judged in 60 s windows: the candidate's and stable's requests.
NC, NB = 300, 5700


def share_log_e(ec: np.ndarray, nc: np.ndarray, eb: np.ndarray, nb: np.ndarray) -> np.ndarray:
    """ShareState's log e-value after each window, vectorized over (streams, windows) counts
    (ratio 1, every window with trials on both sides); `test_the_vectorized_share_...` holds
    it equal to the class."""
    from scipy.special import logsumexp

    log_odds = np.log(nc / nb)[..., None]
    theta = np.array(SHARE_THETAS)
    log_p = -np.log1p(np.exp(-(log_odds + theta))) + np.log1p(np.exp(-log_odds))
    log_q = -np.log1p(np.exp(log_odds + theta)) + np.log1p(np.exp(log_odds))
    log_lr = (ec[..., None] * log_p + eb[..., None] * log_q).cumsum(axis=1)
    return logsumexp(log_lr + np.log(np.array(SHARE_WEIGHTS)), axis=2)


def first_crossing(log_e: np.ndarray, alpha: float) -> np.ndarray:
    """Window (1-based) each stream first reached 1/alpha in, 0 for never."""
    hit = log_e >= -math.log(alpha)
    return np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, 0)


def share_rejections(
    rng: np.random.Generator, nc: np.ndarray, nb: np.ndarray, pc: float, pb: float, alpha: float
) -> np.ndarray:
    """Window each stream's share test first rejected in, 0 for never; `nc`, `nb`:
    (streams, windows) trials."""
    ec, eb = rng.binomial(nc, pc), rng.binomial(nb, pb)
    return first_crossing(share_log_e(ec, nc, eb, nb), alpha)


def test_the_vectorized_share_test_is_the_states() -> None:
    rng = np.random.default_rng(100)
    nc, nb = rng.integers(50, 400, size=(4, 6)), rng.integers(500, 6000, size=(4, 6))
    ec, eb = rng.binomial(nc, 0.03), rng.binomial(nb, 0.01)
    log_e = share_log_e(ec, nc, eb, nb)
    for s in range(4):
        state = ShareState.start(1.0, ALPHA)
        for w in range(6):
            state = state.update(int(ec[s, w]), int(nc[s, w]), int(eb[s, w]), int(nb[s, w]))
            assert state.log_e == pytest.approx(log_e[s, w], abs=1e-9)


def test_share_a_a_at_a_fixed_canary_split_stays_below_alpha() -> None:
    """1% errors on both sides, 300 vs 5,700 requests per window: measured 1.5%."""
    rng = np.random.default_rng(101)
    nc, nb = np.full((STREAMS, WINDOWS), NC), np.full((STREAMS, WINDOWS), NB)
    rejected = (share_rejections(rng, nc, nb, 0.01, 0.01, ALPHA) > 0).mean()
    assert rejected <= ALPHA + MC_MARGIN


def test_share_a_a_at_an_observed_split_below_the_nominal_one_stays_below_alpha() -> None:
    """Nominal 5%, observed ~3% (each window's split drawn afresh), 2% errors on both sides:
    the test conditions on the observed split, so the mismatch costs nothing. Measured 1.35%."""
    rng = np.random.default_rng(102)
    total = rng.poisson(6000, size=(STREAMS, WINDOWS))
    nc = rng.binomial(total, 0.03)
    rejected = (share_rejections(rng, nc, total - nc, 0.02, 0.02, ALPHA) > 0).mean()
    assert rejected <= ALPHA + MC_MARGIN


def test_share_a_better_candidate_is_rejected_less_still() -> None:
    """Candidate at 0.5%, stable at 1%, 30 looks: measured 0 of 2,000."""
    rng = np.random.default_rng(103)
    nc, nb = np.full((STREAMS, WINDOWS), NC), np.full((STREAMS, WINDOWS), NB)
    assert (share_rejections(rng, nc, nb, 0.005, 0.01, ALPHA) > 0).mean() <= ALPHA / 10


def test_share_power_errors_doubled_at_a_five_percent_canary() -> None:
    """Errors 1% -> 2%, 300 vs 5,700 requests per 60 s window, at the default policy's
    relative alpha (0.0054): measured caught within 10 windows in 86.0% (t50 6, t90 11
    windows) of 1,000 releases. The issue's goal (90% within 600 s) is missed by a few points:
    the data allow little more. Even a single alternative fixed at exactly 2x (no mixture)
    reaches ~89% at this alpha. Tripled errors: caught within 5 windows in 97.7% of 300 (t50 2,
    t90 4 windows)."""
    rng = np.random.default_rng(104)
    nc, nb = np.full((1000, 15), NC), np.full((1000, 15), NB)
    first = share_rejections(rng, nc, nb, 0.02, 0.01, RELATIVE_ALPHA)
    caught = ((first > 0) & (first <= 10)).mean()
    assert caught >= 0.82  # measured 0.860; binomial sd over 1,000 is 0.011
    tripled = share_rejections(rng, nc[:300], nb[:300], 0.03, 0.01, RELATIVE_ALPHA)
    assert ((tripled > 0) & (tripled <= 5)).mean() >= 0.93


def test_share_window_factor_has_expectation_at_most_one_under_the_null() -> None:
    """Exact expectation of F over both binomials at the boundary pc = pb."""
    from scipy.stats import binom

    nc, nb, p = 40, 160, 0.05
    ec, eb = np.arange(nc + 1), np.arange(nb + 1)
    weights = np.outer(binom.pmf(ec, nc, p), binom.pmf(eb, nb, p))
    for theta in (math.log(1.5), math.log(10)):
        # log F is linear in the counts
        per_c, per_b = (
            window_log_lr(*counts, 1.0, theta) for counts in ((1, nc, 0, nb), (0, nc, 1, nb))
        )
        factors = np.exp(np.add.outer(ec * per_c, eb * per_b))
        assert float((weights * factors).sum()) <= 1.0


def test_share_state_survives_json_and_ignores_empty_windows() -> None:
    state = ShareState.start(1.0, ALPHA).update(3, 300, 20, 5700)
    again = ShareState.model_validate(json.loads(json.dumps(state.model_dump(mode="json"))))
    assert again == state
    assert state.update(0, 0, 5, 100).log_e == state.log_e  # no candidate trials
    assert state.update(0, 300, 0, 5700).log_e == state.log_e  # no events
    with pytest.raises(ValueError, match="events <= trials"):
        state.update(4, 3, 0, 10)


# --------------------------------------------------------------------------- latency


def lognormal(rng: np.random.Generator, shape: tuple[int, ...], sigma: float = 0.3) -> np.ndarray:
    return 40.0 * np.exp(sigma * rng.standard_normal(shape))


def rank_z(candidate: np.ndarray, baseline: np.ndarray) -> np.ndarray:
    """Mann-Whitney z per row (continuous values: no ties), vectorized over streams."""
    nc, nb = candidate.shape[1], baseline.shape[1]
    pooled = np.concatenate([candidate, baseline], axis=1)
    ranks = pooled.argsort(axis=1).argsort(axis=1) + 1.0
    u = ranks[:, :nc].sum(axis=1) - nc * (nc + 1) / 2.0
    return (u - nc * nb / 2.0) / math.sqrt(nc * nb * (nc + nb + 1) / 12.0)


def mixture_log_e(sums: np.ndarray) -> np.ndarray:
    """normal_mixture_log_e over (streams, windows) running sums of z, vectorized."""
    from scipy.special import log_ndtr

    spread = np.arange(1, sums.shape[1] + 1) + PRIOR_PRECISION
    return (
        math.log(2.0)
        + 0.5 * np.log(PRIOR_PRECISION / spread)
        + sums**2 / (2.0 * spread)
        + log_ndtr(sums / np.sqrt(spread))
    )


def rank_rejections(zs: np.ndarray, alpha: float) -> np.ndarray:
    """Window each stream's normal-mixture e-process first crossed 1/alpha in, 0 for never."""
    return first_crossing(mixture_log_e(zs.cumsum(axis=1)), alpha)


def test_the_vectorized_z_is_the_states_z() -> None:
    rng = np.random.default_rng(200)
    c, b = lognormal(rng, (3, 40)), lognormal(rng, (3, 150))
    state = RankState.start(0.0, ALPHA)
    for row in range(3):
        assert rank_z(c, b)[row] == pytest.approx(mann_whitney_z(c[row], b[row]))
        state = state.update(c[row], b[row])
    assert state.z_sum == pytest.approx(float(rank_z(c, b).sum()))
    assert state.log_e == pytest.approx(normal_mixture_log_e(state.z_sum, 3))
    sums = rank_z(c, b)[None, :].cumsum(axis=1)
    assert mixture_log_e(sums)[0, 2] == pytest.approx(state.log_e)


@pytest.mark.parametrize(("nc", "nb"), [(100, 100), (30, 300)])
def test_rank_a_a_under_continuous_looks_stays_below_alpha(nc: int, nb: int) -> None:
    """Same lognormal latencies (sigma 0.3) on both sides, no tolerance (H0's boundary), 30
    looks: measured 1.6% (100 vs 100) and 2.05% (30 vs 300). The seed's fresh bootstrap at every
    look rolled back 46% of such releases over 120 looks."""
    rng = np.random.default_rng(201 + nc)
    zs = np.stack(
        [rank_z(lognormal(rng, (STREAMS, nc)), lognormal(rng, (STREAMS, nb))) for _ in range(30)],
        axis=1,
    )
    assert (rank_rejections(zs, ALPHA) > 0).mean() <= ALPHA + MC_MARGIN


def tail_counts(candidate: np.ndarray, baseline: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """upper_tail_counts per row, vectorized over streams."""
    pooled = np.concatenate([candidate, baseline], axis=1)
    rank = math.ceil(TAIL_QUANTILE * pooled.shape[1])
    threshold = np.partition(pooled, rank - 1, axis=1)[:, rank - 1 : rank]
    return (candidate > threshold).sum(axis=1), (baseline > threshold).sum(axis=1)


def test_the_vectorized_tail_counts_are_the_functions() -> None:
    rng = np.random.default_rng(209)
    c, b = lognormal(rng, (5, 60)), lognormal(rng, (5, 240))
    kc, kb = tail_counts(c, b)
    for row in range(5):
        assert upper_tail_counts(c[row], b[row]) == (kc[row], kb[row])


def tail_rejections(
    rng: np.random.Generator, streams: int, windows: int, nc: int, nb: int, alpha: float,
    slow_share: float = 0.0, tolerance: float = 0.0,
) -> np.ndarray:  # fmt: skip
    """Window each stream's tail test first rejected in, 0 for never."""
    kc, kb = np.zeros((streams, windows)), np.zeros((streams, windows))
    for w in range(windows):
        c = lognormal(rng, (streams, nc))
        c[rng.random((streams, nc)) < slow_share] *= 4.0
        kc[:, w], kb[:, w] = tail_counts(c, (1.0 + tolerance) * lognormal(rng, (streams, nb)))
    full = np.ones_like(kc)
    return first_crossing(share_log_e(kc, nc * full, kb, nb * full), alpha)


def test_tail_a_a_under_continuous_looks_stays_below_alpha() -> None:
    """Counts above the pooled p95, equal splits of 100 (where an estimated one-sided p95 is
    noisiest), 30 looks: measured 1.75%."""
    rng = np.random.default_rng(210)
    first = tail_rejections(rng, STREAMS, WINDOWS, 100, 100, ALPHA)
    assert (first > 0).mean() <= ALPHA + MC_MARGIN


def test_rank_power_median_ten_percent_slower_at_a_five_percent_canary() -> None:
    """Median +10% (lognormal sigma 0.3), 300 vs 5,700 per window, tolerance 5%, at the
    default policy's alpha for one latency test (0.0036): measured caught within 6 windows in
    99.5% of 200 releases, t50 3 and t90 4 windows (the issue's goal: 3 windows at p90)."""
    rng = np.random.default_rng(220)
    streams, windows = 200, 8
    zs = np.stack(
        [
            rank_z(1.1 * lognormal(rng, (streams, NC)), 1.05 * lognormal(rng, (streams, NB)))
            for _ in range(windows)
        ],
        axis=1,
    )
    first = rank_rejections(zs, LATENCY_ALPHA)
    assert ((first > 0) & (first <= 6)).mean() >= 0.97
    assert np.median(first[first > 0]) <= 4


def test_tail_power_five_percent_of_requests_four_times_slower() -> None:
    """5% of the candidate's requests 4x slower, median unchanged, 300 vs 5,700 per window,
    tolerance 5%: measured caught within 10 windows in 100% of 200 releases (t50 3, t90 6
    windows); the rank test alone caught none of 200 in 10 windows (it sees the bulk)."""
    rng = np.random.default_rng(230)
    first = tail_rejections(rng, 200, 10, NC, NB, LATENCY_ALPHA, slow_share=0.05, tolerance=0.05)
    assert ((first > 0) & (first <= 10)).mean() >= 0.95
    assert np.median(first) <= 4
