"""The live judges end to end on synthetic releases: type-I error under continuous monitoring,
power on shifted samples.

Small versions of rows of `benchmarks/detection.py`: per-request samples built as the store
would, judged window by window by `gates.judge_sample` and `progress.observe` with one
`GateMemory` per release (the default policy: alpha 0.05 per release over its 7 live gates).
Fixed seeds; each bound states its tolerance. The judges' evidence-only statistics are stubbed
to keep the module fast; the first test holds the decisions equal with and without the stubs.
"""

from __future__ import annotations

import math

import pytest

from benchmarks.detection import (
    POLICY_FILE,
    Case,
    Result,
    Roles,
    canary,
    evidence_stubs,
    simulate,
)
from canaryflow.contracts import GatePolicy
from canaryflow.loading import load_policy


@pytest.fixture(scope="module")
def policy() -> GatePolicy:
    return load_policy(POLICY_FILE)


@pytest.fixture
def stubbed(monkeypatch: pytest.MonkeyPatch) -> None:
    for module, name, stub in evidence_stubs():
        monkeypatch.setattr(module, name, stub)


def run(case: Case, policy: GatePolicy, releases: int) -> list[Result]:
    return [simulate(case, policy, i) for i in range(releases)]


def caught_within(results: list[Result], seconds: float) -> float:
    hits = [r for r in results if r.outcome in ("rolled_back", "asked") and r.seconds <= seconds]
    return len(hits) / len(results)


# A 5% canary of 100 req/s in 60 s windows (300 vs 5,700 requests), up to 30 windows.
ERRORS_TRIPLED = Case(
    "t-err3", "errors 1% -> 3%", 100.0, (canary(0.05, 60.0, 30),),
    candidate=Roles(error=0.03),
)  # fmt: skip
MEDIAN_SLOWER = Case(
    "t-p50", "median +10%", 100.0, (canary(0.05, 60.0, 30),), candidate=Roles(scale=1.1)
)
# A/A: 20 windows of 15 s at 5% of 100 req/s (75 vs 1,425 requests), every gate looking after
# every window.
A_A = Case("t-aa", "A/A", 100.0, (canary(0.05, 15.0, 20),), kind="aa")


def test_the_evidence_stubs_change_no_decision(policy: GatePolicy) -> None:
    exact = run(ERRORS_TRIPLED, policy, 3) + run(MEDIAN_SLOWER, policy, 2)
    with pytest.MonkeyPatch.context() as patch:
        for module, name, stub in evidence_stubs():
            patch.setattr(module, name, stub)
        light = run(ERRORS_TRIPLED, policy, 3) + run(MEDIAN_SLOWER, policy, 2)
    assert [(r.outcome, r.seconds) for r in exact] == [(r.outcome, r.seconds) for r in light]


@pytest.mark.usefixtures("stubbed")
def test_a_a_under_continuous_monitoring_rolls_back_at_most_alpha(policy: GatePolicy) -> None:
    """100 releases, 20 looks each, 7 gates: measured 1 rolled back, 99 promoted (the
    benchmark's 120-look row: 0 of 250, see docs/benchmarks.md). Bound: alpha 5% plus two
    binomial sd over 100 (4.4 points)."""
    results = run(A_A, policy, 100)
    assert all(r.outcome in ("promoted", "rolled_back", "asked") for r in results)
    rolled_back = sum(r.outcome == "rolled_back" for r in results)
    assert rolled_back / len(results) <= 0.05 + 2 * math.sqrt(0.05 * 0.95 / 100)
    assert sum(r.outcome == "promoted" for r in results) >= 0.9 * len(results)


@pytest.mark.usefixtures("stubbed")
def test_tripled_errors_are_caught_within_five_minutes(policy: GatePolicy) -> None:
    """Issue 11's goal: t90 <= 300 s. Measured: 97% of 100 within 300 s. Tolerance: the
    share caught within 300 s must be at least 90% minus two binomial sd (6 points)."""
    results = run(ERRORS_TRIPLED, policy, 100)
    assert caught_within(results, 300.0) >= 0.9 - 2 * math.sqrt(0.9 * 0.1 / 100)
    assert all(r.outcome != "asked" for r in results)  # a hard gate: rolled back


@pytest.mark.usefixtures("stubbed")
def test_a_median_ten_percent_slower_is_caught_within_six_windows(policy: GatePolicy) -> None:
    """Issue 11's goal is t90 <= 180 s: missed (docs/benchmarks.md says why: the 5% tolerance
    leaves a 4.8% shift to see, at 1/14 of the release's alpha per test). Pinned at what the
    judges do: measured 44% of 100 within 180 s, 95% within 360 s (the benchmark: t90 360 s over
    1,000); the share within 360 s of 100 releases must be at least 90% minus two binomial sd."""
    results = run(MEDIAN_SLOWER, policy, 100)
    assert caught_within(results, 360.0) >= 0.9 - 2 * math.sqrt(0.9 * 0.1 / 100)
    assert all(r.gates in ("latency_p95,ttft_p95", "latency_p95", "ttft_p95") for r in results)
