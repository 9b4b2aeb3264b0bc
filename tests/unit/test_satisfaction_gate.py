"""The `satisfaction` gate: Welch's interval on mean ratings, its labels, and its place in a
policy (never a default, NODATA without enough ratings, never held by a shadow window)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from pydantic import ValidationError
from scipy.stats import ttest_ind

from canaryflow.analysis.gates import judge_sample
from canaryflow.analysis.judges import JudgeConfig
from canaryflow.analysis.samples import RoleSample, WindowSample
from canaryflow.analysis.satisfaction import mean_difference, satisfaction
from canaryflow.contracts import (
    DEFAULT_LIVE_GATES,
    Decision,
    FeedbackChecker,
    GatePolicy,
    Label,
    LiveGate,
    LiveMetric,
    Severity,
)
from canaryflow.contracts.checkers import parse_checkers

CONFIG = JudgeConfig(alpha=0.05, min_samples=30)
HARD = LiveGate(metric=LiveMetric.SATISFACTION, severity=Severity.HARD, margin=0.05)
SOFT = HARD.model_copy(update={"severity": Severity.SOFT})
NEGATIVE_BELOW = 0.5


def rated(good: int, bad: int, *, n: int = 500) -> RoleSample:
    """`good` ratings of 1.0 (thumbs up) and `bad` of 0.0 (thumbs down)."""
    return RoleSample(n=n, ratings=(1.0,) * good + (0.0,) * bad, negative_ratings=bad)


def stars(counts: dict[int, int]) -> RoleSample:
    """1-5 stars, scaled to 0..1 as the service stores them; 1 and 2 are negative."""
    scale = FeedbackChecker(min_score=1, max_score=5)
    ratings = tuple(scale.scaled(s) for s, k in counts.items() for _ in range(k))
    negative = sum(k for s, k in counts.items() if s < scale.negative_cut)
    return RoleSample(n=1000, ratings=ratings, negative_ratings=negative)


def window(baseline: RoleSample, candidate: RoleSample, role: str = "canary") -> WindowSample:
    return WindowSample(baseline, candidate, candidate_role=role)


# --------------------------------------------------------------------------- the statistic


def test_welchs_interval_matches_scipy() -> None:
    candidate = [0.0, 0.25, 0.5, 0.75, 1.0] * 8 + [0.0] * 10
    baseline = [0.5, 0.75, 1.0, 1.0] * 12
    found = mean_difference(candidate, baseline, 0.05)
    test = ttest_ind(candidate, baseline, equal_var=False)
    low, high = test.confidence_interval(0.95)
    assert found.diff == pytest.approx(sum(candidate) / 50 - sum(baseline) / 48)
    assert (found.ci_low, found.ci_high) == (pytest.approx(low), pytest.approx(high))
    assert found.df == pytest.approx(test.df)
    assert found.p_lower == pytest.approx(
        ttest_ind(candidate, baseline, equal_var=False, alternative="less").pvalue
    )


def test_identical_constant_ratings_give_a_zero_width_interval() -> None:
    found = mean_difference([1.0] * 40, [1.0] * 40, 0.05)
    assert (found.diff, found.ci_low, found.ci_high, found.p_lower) == (0.0, 0.0, 0.0, 1.0)
    lower = mean_difference([0.0] * 40, [1.0] * 40, 0.05)
    assert (lower.diff, lower.ci_high, lower.p_lower) == (-1.0, -1.0, 0.0)


def test_fewer_than_two_ratings_a_side_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        mean_difference([1.0], [1.0, 0.0], 0.05)


# --------------------------------------------------------------------------- the gate


def test_an_equal_candidate_passes_with_evidence() -> None:
    result = satisfaction(HARD, window(rated(160, 40), rated(158, 42)), CONFIG)
    assert result.label is Label.PASS, result.reason
    e = result.evidence
    assert (e.n_baseline, e.n_candidate) == (200, 200)
    assert (e.baseline, e.candidate) == (pytest.approx(0.8), pytest.approx(0.79))
    assert e.ci_low is not None and e.ci_high is not None and e.ci_low < e.estimate < e.ci_high
    assert e.threshold == -0.05
    assert e.detail["negative_candidate"] == 42 and e.detail["negative_baseline"] == 40
    assert e.detail["negative_share_candidate"] == pytest.approx(0.21)
    assert "0.790 vs 0.800" in result.reason and "negative 21.0% vs 20.0%" in result.reason


def test_a_candidate_users_dislike_fails_a_hard_gate_and_asks_on_a_soft_one() -> None:
    sample = window(rated(160, 40), rated(110, 90))  # 80% happy vs 55%
    hard = satisfaction(HARD, sample, CONFIG)
    assert hard.label is Label.FAIL
    assert hard.reason.startswith("users rate the candidate lower")
    assert hard.evidence.ci_high is not None and hard.evidence.ci_high < 0
    assert satisfaction(SOFT, sample, CONFIG).label is Label.REVIEW


def test_a_drop_within_the_margin_or_within_noise_passes() -> None:
    # 3 points lower with a tight interval: real, but inside a 5-point margin.
    tight = satisfaction(HARD, window(rated(8000, 2000), rated(7700, 2300)), CONFIG)
    assert tight.evidence.ci_high is not None and tight.evidence.ci_high < 0
    assert tight.label is Label.PASS
    # 10 points lower on 30 ratings a side: beyond the margin, but the interval reaches 0.
    noisy = satisfaction(HARD, window(rated(24, 6), rated(21, 9)), CONFIG)
    assert noisy.evidence.estimate == pytest.approx(-0.1)
    assert noisy.evidence.ci_high is not None and noisy.evidence.ci_high > 0
    assert noisy.label is Label.PASS


def test_star_ratings_are_judged_on_the_same_zero_to_one_scale() -> None:
    baseline = stars({5: 60, 4: 30, 3: 5, 2: 3, 1: 2})
    worse = stars({5: 20, 4: 25, 3: 20, 2: 20, 1: 15})
    result = satisfaction(HARD, window(baseline, worse), CONFIG)
    assert result.label is Label.FAIL
    assert result.evidence.detail["negative_candidate"] == 35
    assert result.evidence.detail["negative_baseline"] == 5


def test_too_few_ratings_is_nodata_never_a_pass() -> None:
    result = satisfaction(HARD, window(rated(160, 40), rated(20, 9)), CONFIG)
    assert result.label is Label.NODATA
    assert "too few ratings" in result.reason and "candidate 29" in result.reason
    assert "/v1/feedback" in result.reason
    # A candidate no user rated at all, however badly its answers went: still NODATA.
    assert satisfaction(HARD, window(rated(160, 40), rated(0, 0)), CONFIG).label is Label.NODATA


def test_a_shadow_window_is_soft_nodata_whatever_the_gate_says() -> None:
    result = satisfaction(HARD, window(rated(160, 40), rated(0, 0), role="shadow"), CONFIG)
    assert (result.label, result.severity) == (Label.NODATA, Severity.SOFT)
    assert "canary windows only" in result.reason


# --------------------------------------------------------------------------- in a policy


def test_it_is_not_a_default_gate() -> None:
    assert LiveMetric.SATISFACTION not in {g.metric for g in DEFAULT_LIVE_GATES}
    assert LiveMetric.SATISFACTION not in {g.metric for g in GatePolicy().live}


def test_a_policy_that_does_not_name_it_ignores_ratings() -> None:
    """Users who never rate: the default policy's decision does not depend on ratings."""
    base = RoleSample(n=400, latencies_ms=tuple(float(x) for x in range(40, 440)))
    unrated = WindowSample(base, base, candidate_role="canary")
    disliked = WindowSample(
        replace(base, ratings=(1.0,) * 200),
        replace(base, ratings=(0.0,) * 200, negative_ratings=200),
        candidate_role="canary",
    )
    first, decision, _ = judge_sample(GatePolicy(), unrated)
    second, same, _ = judge_sample(GatePolicy(), disliked)
    assert "satisfaction" not in {r.gate for r in (*first, *second)}
    assert decision is same


def test_named_soft_it_never_holds_a_window_without_ratings() -> None:
    base = RoleSample(n=400, latencies_ms=tuple(float(x) for x in range(40, 440)))
    policy = GatePolicy(live=(SOFT,))
    for role in ("canary", "shadow"):
        results, decision, _ = judge_sample(policy, WindowSample(base, base, candidate_role=role))
        assert {r.gate: r.label for r in results}["satisfaction"] is Label.NODATA
        assert decision is Decision.PASS
    hard = GatePolicy(live=(HARD,))
    _, canary, _ = judge_sample(hard, WindowSample(base, base, candidate_role="canary"))
    assert canary is Decision.INCONCLUSIVE  # asked for: no ratings is not a pass
    _, shadow, _ = judge_sample(hard, WindowSample(base, base, candidate_role="shadow"))
    assert shadow is Decision.PASS


def test_the_gate_takes_a_margin_only() -> None:
    with pytest.raises(ValidationError, match="give margin"):
        LiveGate(metric=LiveMetric.SATISFACTION, severity=Severity.SOFT, max_rate=0.1)
    assert HARD.margin == 0.05


def test_a_samples_negative_count_cannot_exceed_its_ratings() -> None:
    with pytest.raises(ValueError, match="negative_ratings"):
        RoleSample(ratings=(1.0,), negative_ratings=2)
    assert replace(rated(1, 1), negative_ratings=0).negative_ratings == 0


# --------------------------------------------------------------------------- the scale


def test_the_feedback_entry_sets_the_scale_and_is_checked_at_load() -> None:
    [entry] = parse_checkers([{"kind": "feedback", "min_score": 1, "max_score": 5}])
    assert isinstance(entry, FeedbackChecker)
    assert (entry.scaled(1), entry.scaled(3), entry.scaled(5)) == (0.0, 0.5, 1.0)
    assert entry.negative_cut == 3
    default = FeedbackChecker()
    assert (default.min_score, default.max_score, default.negative_cut) == (0, 1, NEGATIVE_BELOW)
    with pytest.raises(ValueError, match="max_score"):
        parse_checkers([{"kind": "feedback", "min_score": 5, "max_score": 1}])
    with pytest.raises(ValueError, match="negative_below"):
        parse_checkers([{"kind": "feedback", "min_score": 1, "max_score": 5, "negative_below": 9}])
    with pytest.raises(ValueError, match="finite"):
        FeedbackChecker(min_score=-math.inf)
