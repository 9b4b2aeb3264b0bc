"""Judges on literal arrays and counts: each verdict, its edge cases and its evidence."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest

from canaryflow.analysis import judges
from canaryflow.analysis.latency import latency
from canaryflow.analysis.rates import rate
from canaryflow.analysis.samples import RoleSample, WindowSample
from canaryflow.contracts import (
    GateResult,
    Label,
    LiveGate,
    LiveMetric,
    RequestRecord,
    Role,
    Severity,
)
from canaryflow.errors import PolicyError

CONFIG = judges.JudgeConfig(alpha=0.05, min_samples=30)
BASE_MS = tuple(float(x) for x in np.linspace(40.0, 160.0, 300))
LATENCY = LiveGate(metric=LiveMetric.LATENCY_P95, severity=Severity.HARD, max_ratio=1.2)
HALLUCINATION = LiveGate(
    metric=LiveMetric.HALLUCINATION_RATE, severity=Severity.HARD, max_rate=0.005
)
ERRORS = LiveGate(metric=LiveMetric.ERROR_RATE, severity=Severity.HARD, max_rate=0.02)
COST = LiveGate(metric=LiveMetric.COST_PER_1K, severity=Severity.SOFT, max_ratio=1.5)
ACCURACY = LiveGate(metric=LiveMetric.ACCURACY, severity=Severity.SOFT, margin=0.05)


def latencies(baseline: tuple[float, ...], candidate: tuple[float, ...]) -> WindowSample:
    return WindowSample(
        RoleSample(n=len(baseline), latencies_ms=baseline),
        RoleSample(n=len(candidate), latencies_ms=candidate),
    )


def checked(baseline: int, candidate: int, n: int = 200, nb: int = 200) -> WindowSample:
    return WindowSample(
        RoleSample(n=nb, checked=nb, hallucinations=baseline),
        RoleSample(n=n, checked=n, hallucinations=candidate),
    )


# --------------------------------------------------------------------------- latency


TTFT = LiveGate(metric=LiveMetric.TTFT_P95, severity=Severity.HARD, max_ratio=1.2)


def judge_latency(gate: LiveGate, sample: WindowSample) -> GateResult:
    return latency(gate, sample, CONFIG)[0]


def _streamed(ttft_share: float, n: int = 300) -> list[RequestRecord]:
    at = datetime(2026, 1, 1, tzinfo=UTC)
    return [
        RequestRecord(
            request_id=f"r{i}",
            at=at,
            service="s",
            version="v",
            role=Role.CANARY,
            status=200,
            latency_ms=total,
            streamed=True,
            ttft_ms=total * ttft_share,
        )
        for i, total in enumerate(BASE_MS[:n])
    ]


def test_twice_the_ttft_at_the_same_total_latency_fails_ttft_not_latency() -> None:
    sample = WindowSample(
        RoleSample.from_records(_streamed(0.3)), RoleSample.from_records(_streamed(0.6))
    )
    assert judge_latency(LATENCY, sample).label is Label.PASS
    result = judge_latency(TTFT, sample)
    assert result.label is Label.FAIL
    assert result.evidence.estimate == pytest.approx(2.0, rel=0.01)  # the p95 ratio, evidence
    assert result.reason.startswith("candidate slower than 1.05 x stable: TTFT p50")
    assert "latency_p95" not in result.reason


def test_unstreamed_answers_do_not_dilute_the_streamed_ones() -> None:
    unstreamed = [
        r.model_copy(update={"request_id": f"u{i}", "streamed": False, "ttft_ms": r.latency_ms})
        for i, r in enumerate(_streamed(1))
    ]
    sample = WindowSample(
        RoleSample.from_records(_streamed(0.3) + unstreamed),
        RoleSample.from_records(_streamed(0.6) + unstreamed),
    )
    result = judge_latency(TTFT, sample)
    assert result.label is Label.FAIL and result.evidence.n_candidate == 300


def test_a_window_without_streamed_answers_is_judged_on_latency() -> None:
    unstreamed = [r.model_copy(update={"streamed": False}) for r in _streamed(1)]
    role = RoleSample.from_records(unstreamed)
    assert role.ttfts_ms == ()
    result = judge_latency(TTFT, WindowSample(role, role))
    assert result.label is Label.PASS and result.evidence.n_candidate == 300
    assert "no streamed answers" in result.reason
    slower = RoleSample.from_records(
        [r.model_copy(update={"latency_ms": 2 * r.latency_ms}) for r in unstreamed]
    )
    assert judge_latency(TTFT, WindowSample(role, slower)).label is Label.FAIL


def test_clearly_slower_candidate_fails_latency() -> None:
    result = judge_latency(LATENCY, latencies(BASE_MS, tuple(1.5 * x for x in BASE_MS)))
    assert result.label is Label.FAIL
    assert result.evidence.estimate == pytest.approx(1.5, rel=0.01)
    assert result.evidence.ci_low is not None and result.evidence.ci_low > 1.0
    assert result.evidence.detail["hl_shift_ms"] > 0
    assert result.evidence.p_value is not None and result.evidence.p_value < 0.001
    assert result.evidence.threshold == 1.05  # 1 + the default tolerance
    assert result.evidence.detail["p95_limit"] == 1.2


def test_identical_latencies_pass() -> None:
    result = judge_latency(LATENCY, latencies(BASE_MS, BASE_MS))
    assert result.label is Label.PASS
    assert result.evidence.estimate == 1.0
    assert result.evidence.ci_low is not None and result.evidence.ci_low <= 1.0
    assert result.evidence.detail["hl_shift_ms"] == pytest.approx(0.0, abs=1e-9)


def test_latency_evidence_reports_p50_p95_p99_of_both_roles() -> None:
    result = judge_latency(LATENCY, latencies(BASE_MS, tuple(1.5 * x for x in BASE_MS)))
    detail = result.evidence.detail
    for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
        expected = float(np.sort(BASE_MS)[int(np.ceil(q * 300)) - 1])
        assert detail[f"{name}_baseline_ms"] == pytest.approx(expected)
        assert detail[f"{name}_candidate_ms"] == pytest.approx(1.5 * expected)
        assert f"{name} " in result.reason


def test_slowdown_within_the_tolerance_passes_however_often_it_is_judged() -> None:
    gate = LATENCY.model_copy(update={"tolerance": 0.10})
    sample = latencies(BASE_MS, tuple(1.08 * x for x in BASE_MS))
    state = None
    for _ in range(20):
        result, state = latency(gate, sample, CONFIG, state)
        assert result.label is Label.PASS
    assert result.evidence.threshold == pytest.approx(1.10)


def test_a_small_slowdown_beyond_the_tolerance_is_caught_as_windows_add_up() -> None:
    """Median 1.1x against the default 5% tolerance (lognormal, sigma 0.3, 300 per role): too
    little for one window, but every window adds to the same test."""
    rng = np.random.default_rng(5)
    state, labels = None, []
    for _ in range(15):
        base, cand = (40 * np.exp(0.3 * rng.standard_normal(300)) for _ in range(2))
        sample = latencies(tuple(base), tuple(1.1 * cand))
        result, state = latency(LATENCY, sample, CONFIG, state)
        labels.append(result.label)
    assert labels[0] is Label.PASS and labels[-1] is Label.FAIL
    assert state is not None and state.median.rejected and state.median.looks == 15


def test_a_slow_tail_at_an_unchanged_median_is_caught() -> None:
    rng = np.random.default_rng(7)
    base = 40 * np.exp(0.3 * rng.standard_normal(2000))
    cand = 40 * np.exp(0.3 * rng.standard_normal(300))
    cand[rng.random(300) < 0.05] *= 4  # 5% of requests 4x slower
    sample = latencies(tuple(base), tuple(cand))
    result, state = latency(LATENCY, sample, CONFIG)
    assert not state.median.rejected  # the bulk did not move
    assert state.tail.rejected and result.label is Label.FAIL
    assert "tail slower" in result.reason
    detail = result.evidence.detail
    assert float(detail["p99_candidate_ms"]) > 2 * float(detail["p99_baseline_ms"])


def test_latency_breach_of_a_soft_gate_asks_for_review() -> None:
    soft = LATENCY.model_copy(update={"severity": Severity.SOFT})
    result = judge_latency(soft, latencies(BASE_MS, tuple(2 * x for x in BASE_MS)))
    assert result.label is Label.REVIEW


def test_too_few_latencies_is_nodata_naming_the_counts() -> None:
    result = judge_latency(LATENCY, latencies(BASE_MS, BASE_MS[:12]))
    assert result.label is Label.NODATA
    assert "candidate 12" in result.reason and "300" in result.reason


def test_latency_gate_without_a_ratio_is_a_policy_error() -> None:
    wrong = LiveGate(metric=LiveMetric.LATENCY_P95, severity=Severity.HARD, max_rate=0.1)
    with pytest.raises(PolicyError, match="needs max_ratio"):
        judge_latency(wrong, latencies(BASE_MS, BASE_MS))


def test_tolerance_belongs_to_latency_gates_and_relative_ratio_to_rate_gates() -> None:
    with pytest.raises(ValueError, match="tolerance belongs"):
        LiveGate(metric=LiveMetric.ERROR_RATE, severity=Severity.HARD, max_rate=0.1, tolerance=0.1)
    with pytest.raises(ValueError, match="relative_ratio belongs"):
        LiveGate(metric=LiveMetric.LATENCY_P95, severity=Severity.HARD, max_ratio=1.2,
                 relative_ratio=1.5)  # fmt: skip
    assert (LATENCY.latency_tolerance, HALLUCINATION.rate_ratio) == (0.05, 1.0)


# --------------------------------------------------------------------------- rates


def test_eight_percent_hallucinations_over_200_checked_fails() -> None:
    result, states = rate(HALLUCINATION, checked(1, 16), CONFIG)
    assert result.label is Label.FAIL
    assert result.evidence.candidate == 0.08
    assert result.evidence.ci_low is not None and result.evidence.ci_low > 0.005
    assert result.evidence.detail["fisher_p_vs_baseline"] < 0.001
    assert states.candidate.rejected_at == 1 and states.relative.rejected_at == 1


@pytest.mark.parametrize("events", [0, 1])
def test_rates_at_or_below_the_bound_pass(events: int) -> None:
    result, states = rate(HALLUCINATION, checked(0, events), CONFIG)
    assert result.label is Label.PASS
    assert not states.candidate.rejected and not states.relative.rejected
    assert result.evidence.threshold == 0.005


def test_few_checked_answers_is_nodata() -> None:
    result, _ = rate(HALLUCINATION, checked(0, 0, n=10), CONFIG)
    assert result.label is Label.NODATA
    assert "0/10" in result.reason


def test_overwhelming_rate_fails_even_below_min_samples() -> None:
    result, _ = rate(HALLUCINATION, checked(0, 8, n=10), CONFIG)
    assert result.label is Label.FAIL


def test_error_rate_counts_errors_per_request() -> None:
    sample = WindowSample(RoleSample(n=500, errors=5), RoleSample(n=500, errors=60))
    result, _ = rate(ERRORS, sample, CONFIG)
    assert result.label is Label.FAIL
    assert (result.evidence.n_candidate, result.evidence.candidate) == (500, 0.12)


def test_rate_state_accumulates_across_windows() -> None:
    first, states = rate(HALLUCINATION, checked(0, 4), CONFIG)
    second, states = rate(HALLUCINATION, checked(0, 4), CONFIG, states)
    assert first.label is Label.PASS
    assert second.label is Label.FAIL
    assert (states.candidate.events, states.candidate.trials, states.candidate.windows) == (
        8,
        400,
        2,
    )
    assert (states.relative.events_baseline, states.relative.trials_baseline) == (0, 400)


def canary(eb: int, ec: int, nb: int = 5700, nc: int = 300) -> WindowSample:
    """A 5% canary's minute at 100 req/s: stable's and the candidate's errors."""
    return WindowSample(RoleSample(n=nb, errors=eb), RoleSample(n=nc, errors=ec))


def test_a_candidate_equal_to_a_stable_above_the_ceiling_is_asked_about_not_failed() -> None:
    """Both at 4% errors against a 2% ceiling: the candidate's ceiling test rejects, but so
    does stable's, and the candidate is not worse than stable: a human decides."""
    states, labels = None, []
    for _ in range(10):
        result, states = rate(ERRORS, canary(228, 12), CONFIG, states)
        labels.append(result.label)
    assert states is not None and states.candidate.rejected and states.baseline.rejected
    assert not states.relative.rejected
    assert Label.FAIL not in labels and labels[-1] is Label.REVIEW
    assert "stable is above the ceiling too" in result.reason
    detail = result.evidence.detail
    assert detail["pi_window"] == pytest.approx(0.05)
    assert (detail["cumulative_events_baseline"], detail["cumulative_trials_baseline"]) == (
        2280,
        57000,
    )
    assert "relative_e_value" in detail and "e_value" in detail


def test_a_better_candidate_is_never_failed() -> None:
    """Stable at 4%, the candidate at 2.7% (ceiling 2%), 30 windows: REVIEW at worst."""
    states = None
    for _ in range(30):
        result, states = rate(ERRORS, canary(228, 8), CONFIG, states)
        assert result.label is not Label.FAIL
    assert states is not None and states.relative.e_value < 1e-3


def test_a_candidate_worse_than_stable_fails_below_the_ceiling() -> None:
    """Stable at 0.5%, the candidate at 1.7%: under the 2% ceiling, but 3x stable's."""
    states, windows = None, 0
    while states is None or not states.relative.rejected:
        result, states = rate(ERRORS, canary(28, 5), CONFIG, states)
        windows += 1
    assert result.label is Label.FAIL and windows <= 6
    assert not states.candidate.rejected
    assert result.reason.startswith("candidate worse than stable")


def test_the_relative_test_uses_the_observed_split() -> None:
    """A canary that got 3% of the requests is compared at 3%, not at its nominal 5%."""
    result, states = rate(ERRORS, canary(57, 2, nb=5820, nc=180), CONFIG)
    assert result.evidence.detail["pi_window"] == pytest.approx(0.03)
    assert states.relative.log_e < 0.0  # 2 of 59 errors is 3.4%: no evidence


# --------------------------------------------------------------------------- cost, accuracy


def costs(per_request_b: float, per_request_c: float, n: int = 100) -> WindowSample:
    def role(each: float) -> RoleSample:
        # costs alternate between 0.8x and 1.2x of `each`
        values = [each * (0.8 if i % 2 else 1.2) for i in range(n)]
        return RoleSample(n=n, cost_usd=sum(values), cost_sq_usd=sum(v * v for v in values))

    return WindowSample(role(per_request_b), role(per_request_c))


def test_costlier_candidate_asks_for_review() -> None:
    result = judges.cost_per_1k(COST, costs(0.001, 0.002), CONFIG)
    assert result.label is Label.REVIEW
    assert result.evidence.estimate == pytest.approx(2.0)
    assert result.evidence.baseline == pytest.approx(1.0)  # USD per 1k requests


def test_equal_cost_passes() -> None:
    result = judges.cost_per_1k(COST, costs(0.001, 0.001), CONFIG)
    assert result.label is Label.PASS
    assert result.evidence.ci_low is not None and result.evidence.ci_low < 1.0


def test_accuracy_drop_beyond_the_margin_asks_for_review() -> None:
    sample = WindowSample(
        RoleSample(n=400, checked=300, facts=300, correct=285),
        RoleSample(n=400, checked=300, facts=300, correct=225),
    )
    result = judges.accuracy(ACCURACY, sample, CONFIG)
    assert result.label is Label.REVIEW
    assert result.evidence.estimate == pytest.approx(-0.2)
    assert result.evidence.ci_high is not None and result.evidence.ci_high < 0


def test_equal_accuracy_passes_and_reports_non_inferiority() -> None:
    role = RoleSample(n=600, checked=500, facts=500, correct=490)
    result = judges.accuracy(ACCURACY, WindowSample(role, role), CONFIG)
    assert result.label is Label.PASS
    assert result.evidence.detail["non_inferior"] == "yes"


# --------------------------------------------------------------------------- samples


def test_observability_names_the_short_role() -> None:
    sample = WindowSample(RoleSample(n=500), RoleSample(n=7))
    result = judges.observability(sample, CONFIG)
    assert result.label is Label.NODATA
    assert "candidate 7" in result.reason and "at least 30" in result.reason


def test_role_sample_from_records_counts_flags_and_errors() -> None:
    def record(i: int, **kw: object) -> RequestRecord:
        return RequestRecord.model_validate(
            {
                "request_id": f"r{i}",
                "at": datetime(2026, 1, 1, tzinfo=UTC),
                "service": "svc",
                "version": "2",
                "role": Role.CANARY,
                "status": 200,
                "latency_ms": 10.0 + i,
                "cost_usd": 0.001,
                **kw,
            }
        )

    records = [
        record(0, status=502),
        record(1, checked=True, hallucination=True, unsafe=False),
        record(2, checked=True, hallucination=False, refusal=True),
        record(3, checked=True, unsafe=True),
        record(4, status=404),
    ]
    role = RoleSample.from_records(records)
    assert (role.n, role.errors, role.checked) == (5, 1, 3)
    assert (role.hallucinations, role.facts, role.correct) == (1, 2, 1)
    assert (role.unsafe, role.refusals) == (1, 1)
    assert role.latencies_ms == (10.0, 11.0, 12.0, 13.0, 14.0)
    assert role.cost_per_1k == pytest.approx(1.0)


def test_role_sample_refuses_more_flags_than_checks() -> None:
    with pytest.raises(ValueError, match="hallucinations=5"):
        RoleSample(n=10, checked=3, hallucinations=5)
