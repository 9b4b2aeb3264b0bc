"""Judges on literal arrays and counts: each verdict, its edge cases and its evidence."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest

from canaryflow.analysis import judges
from canaryflow.analysis.samples import RoleSample, WindowSample
from canaryflow.contracts import Label, LiveGate, LiveMetric, RequestRecord, Role, Severity
from canaryflow.errors import PolicyError

CONFIG = judges.JudgeConfig(alpha=0.05, min_samples=30)
BASE_MS = tuple(float(x) for x in np.linspace(40.0, 160.0, 300))
LATENCY = LiveGate(metric=LiveMetric.LATENCY_P95, severity=Severity.HARD, max_ratio=1.2)
HALLUCINATION = LiveGate(
    metric=LiveMetric.HALLUCINATION_RATE, severity=Severity.HARD, max_rate=0.005
)
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
    assert judges.latency_p95(LATENCY, sample, CONFIG).label is Label.PASS
    result = judges.ttft_p95(TTFT, sample, CONFIG)
    assert result.label is Label.FAIL
    assert result.evidence.estimate == pytest.approx(2.0, rel=0.01)
    assert result.reason.startswith("candidate slower: TTFT p95")


def test_unstreamed_answers_do_not_dilute_the_streamed_ones() -> None:
    unstreamed = [
        r.model_copy(update={"request_id": f"u{i}", "streamed": False, "ttft_ms": r.latency_ms})
        for i, r in enumerate(_streamed(1))
    ]
    sample = WindowSample(
        RoleSample.from_records(_streamed(0.3) + unstreamed),
        RoleSample.from_records(_streamed(0.6) + unstreamed),
    )
    result = judges.ttft_p95(TTFT, sample, CONFIG)
    assert result.label is Label.FAIL and result.evidence.n_candidate == 300


def test_a_window_without_streamed_answers_is_judged_on_latency() -> None:
    unstreamed = [r.model_copy(update={"streamed": False}) for r in _streamed(1)]
    role = RoleSample.from_records(unstreamed)
    assert role.ttfts_ms == ()
    result = judges.ttft_p95(TTFT, WindowSample(role, role), CONFIG)
    assert result.label is Label.PASS and result.evidence.n_candidate == 300
    assert "no streamed answers" in result.reason
    slower = RoleSample.from_records(
        [r.model_copy(update={"latency_ms": 2 * r.latency_ms}) for r in unstreamed]
    )
    assert judges.ttft_p95(TTFT, WindowSample(role, slower), CONFIG).label is Label.FAIL


def test_clearly_slower_candidate_fails_latency() -> None:
    result = judges.latency_p95(
        LATENCY, latencies(BASE_MS, tuple(1.5 * x for x in BASE_MS)), CONFIG
    )
    assert result.label is Label.FAIL
    assert result.evidence.estimate == pytest.approx(1.5, rel=0.01)
    assert result.evidence.ci_low is not None and result.evidence.ci_low > 1.0
    assert result.evidence.detail["hl_shift_ms"] > 0
    assert result.evidence.p_value is not None and result.evidence.p_value < 0.001
    assert result.evidence.threshold == 1.2


def test_identical_latencies_pass() -> None:
    result = judges.latency_p95(LATENCY, latencies(BASE_MS, BASE_MS), CONFIG)
    assert result.label is Label.PASS
    assert result.evidence.estimate == 1.0
    assert result.evidence.ci_low is not None and result.evidence.ci_low <= 1.0
    assert result.evidence.detail["hl_shift_ms"] == pytest.approx(0.0, abs=1e-9)


def test_slowdown_within_the_ratio_passes() -> None:
    result = judges.latency_p95(
        LATENCY, latencies(BASE_MS, tuple(1.1 * x for x in BASE_MS)), CONFIG
    )
    assert result.label is Label.PASS
    assert result.evidence.estimate == pytest.approx(1.1, rel=0.01)


def test_latency_breach_of_a_soft_gate_asks_for_review() -> None:
    soft = LATENCY.model_copy(update={"severity": Severity.SOFT})
    result = judges.latency_p95(soft, latencies(BASE_MS, tuple(2 * x for x in BASE_MS)), CONFIG)
    assert result.label is Label.REVIEW


def test_too_few_latencies_is_nodata_naming_the_counts() -> None:
    result = judges.latency_p95(LATENCY, latencies(BASE_MS, BASE_MS[:12]), CONFIG)
    assert result.label is Label.NODATA
    assert "candidate 12" in result.reason and "300" in result.reason


def test_latency_gate_without_a_ratio_is_a_policy_error() -> None:
    wrong = LiveGate(metric=LiveMetric.LATENCY_P95, severity=Severity.HARD, max_rate=0.1)
    with pytest.raises(PolicyError, match="needs max_ratio"):
        judges.latency_p95(wrong, latencies(BASE_MS, BASE_MS), CONFIG)


# --------------------------------------------------------------------------- rates


def test_eight_percent_hallucinations_over_200_checked_fails() -> None:
    result, state = judges.rate(HALLUCINATION, checked(1, 16), CONFIG)
    assert result.label is Label.FAIL
    assert result.evidence.candidate == 0.08
    assert result.evidence.ci_low is not None and result.evidence.ci_low > 0.005
    assert result.evidence.detail["fisher_p_vs_baseline"] < 0.001
    assert state.rejected_at == 1


@pytest.mark.parametrize("events", [0, 1])
def test_rates_at_or_below_the_bound_pass(events: int) -> None:
    result, state = judges.rate(HALLUCINATION, checked(0, events), CONFIG)
    assert result.label is Label.PASS
    assert not state.rejected
    assert result.evidence.threshold == 0.005


def test_few_checked_answers_is_nodata() -> None:
    result, _ = judges.rate(HALLUCINATION, checked(0, 0, n=10), CONFIG)
    assert result.label is Label.NODATA
    assert "0/10" in result.reason


def test_overwhelming_rate_fails_even_below_min_samples() -> None:
    result, _ = judges.rate(HALLUCINATION, checked(0, 8, n=10), CONFIG)
    assert result.label is Label.FAIL


def test_error_rate_counts_errors_per_request() -> None:
    gate = LiveGate(metric=LiveMetric.ERROR_RATE, severity=Severity.HARD, max_rate=0.02)
    sample = WindowSample(RoleSample(n=500, errors=5), RoleSample(n=500, errors=60))
    result, _ = judges.rate(gate, sample, CONFIG)
    assert result.label is Label.FAIL
    assert (result.evidence.n_candidate, result.evidence.candidate) == (500, 0.12)


def test_rate_state_accumulates_across_windows() -> None:
    first, state = judges.rate(HALLUCINATION, checked(0, 4), CONFIG)
    second, state = judges.rate(HALLUCINATION, checked(0, 4), CONFIG, state)
    assert first.label is Label.PASS
    assert second.label is Label.FAIL
    assert (state.events, state.trials, state.windows) == (8, 400, 2)


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
