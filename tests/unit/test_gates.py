"""A whole policy on one constructed window, and the policy files themselves."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from canaryflow.analysis.gates import GateMemory, judge_sample
from canaryflow.analysis.judges import JudgeConfig
from canaryflow.analysis.samples import RoleSample, WindowSample
from canaryflow.analysis.sources import StoreSource
from canaryflow.contracts import (
    Decision,
    GatePolicy,
    GateResult,
    Label,
    LiveGate,
    LiveMetric,
    RequestRecord,
    Role,
    Severity,
)
from canaryflow.dataplane.store import Store
from canaryflow.errors import PolicyError
from canaryflow.loading import load_policy

POLICIES = Path(__file__).resolve().parents[2] / "deployments" / "policies"
DEFAULT = load_policy(POLICIES / "default.yaml")
LATENCIES = tuple(float(x) for x in np.linspace(40.0, 160.0, 400))


BASE = RoleSample(
    n=400,
    errors=2,
    latencies_ms=LATENCIES,
    tokens_in=40_000,
    tokens_out=20_000,
    cost_usd=0.4,
    cost_sq_usd=400 * 0.001**2,
    checked=200,
    facts=200,
    correct=190,
)


def role(**changes: Any) -> RoleSample:
    return replace(BASE, **changes)


def labels(results: tuple[GateResult, ...]) -> dict[str, Label]:
    return {r.gate: r.label for r in results}


def test_a_good_candidate_passes_every_gate() -> None:
    results, decision, _ = judge_sample(DEFAULT, WindowSample(role(), role()), None)
    assert decision is Decision.PASS
    assert [r.gate for r in results] == [
        "observability",
        "latency_p95",
        "ttft_p95",
        "hallucination_rate",
        "error_rate",
        "unsafe_rate",
        "cost_per_1k",
        "accuracy",
    ]
    assert all(r.label is Label.PASS for r in results)


def test_hallucinating_candidate_fails_and_says_why() -> None:
    bad = role(hallucinations=16, correct=174)
    results, decision, state = judge_sample(DEFAULT, WindowSample(role(), bad), None)
    assert decision is Decision.FAIL
    assert labels(results)["hallucination_rate"] is Label.FAIL
    found = next(r for r in results if r.gate == "hallucination_rate")
    assert "16/200" in found.reason
    assert state.rates["hallucination_rate<=0.005"].rejected_at == 1


def test_costlier_candidate_pauses_for_review() -> None:
    results, decision, _ = judge_sample(DEFAULT, WindowSample(role(), role(cost_usd=1.2)), None)
    assert decision is Decision.REVIEW
    assert labels(results)["cost_per_1k"] is Label.REVIEW


def test_too_few_requests_is_inconclusive_never_a_pass() -> None:
    few = RoleSample(
        n=10, latencies_ms=LATENCIES[:10], cost_usd=0.01, checked=5, facts=5, correct=5
    )
    results, decision, _ = judge_sample(DEFAULT, WindowSample(role(), few), None)
    assert decision is Decision.INCONCLUSIVE
    assert labels(results)["observability"] is Label.NODATA
    assert Label.PASS not in {labels(results)[g] for g in ("latency_p95", "accuracy")}


def test_a_gate_that_raises_is_an_error_and_the_rest_are_judged() -> None:
    broken = LiveGate(metric=LiveMetric.LATENCY_P95, severity=Severity.HARD, max_rate=0.1)
    policy = DEFAULT.model_copy(update={"live": (broken, *DEFAULT.live[1:])})
    results, decision, _ = judge_sample(policy, WindowSample(role(), role()), None)
    found = labels(results)
    assert found["latency_p95"] is Label.ERROR
    assert "PolicyError" in next(r.reason for r in results if r.gate == "latency_p95")
    assert all(found[g] is Label.PASS for g in found if g != "latency_p95")
    assert decision is Decision.FAIL  # a hard gate that cannot judge never lets a release pass


def test_memory_carries_evidence_from_window_to_window_as_json() -> None:
    sample = WindowSample(role(), role(hallucinations=4, correct=186))
    decisions, memory = [], None
    for _ in range(3):
        _results, decision, memory = judge_sample(DEFAULT, sample, memory)
        decisions.append(decision)
        # what a Prefect task result or the ledger would do to it
        memory = GateMemory.model_validate_json(memory.model_dump_json())
    # 2% against stable's 0 of the same 200 checked answers per window: not enough in one or
    # two windows at the release's alpha split across seven gates, enough in three.
    assert decisions == [Decision.PASS, Decision.PASS, Decision.FAIL]
    assert memory is not None
    assert memory.rates["hallucination_rate<=0.005"].trials == 600
    assert memory.stable_rates["hallucination_rate<=0.005"].trials == 600
    assert memory.relative["hallucination_rate<=1*stable"].rejected_at == 3
    assert memory.latency["latency_p95~0.05"].median.looks == 3
    assert memory.latency["ttft_p95~0.05"].tail.windows == 3


def test_the_release_alpha_is_split_across_the_live_gates() -> None:
    config = JudgeConfig.from_policy(DEFAULT)
    assert config.alpha == pytest.approx(0.05 / 7)
    _, _, memory = judge_sample(DEFAULT, WindowSample(role(), role()), None)
    assert memory.relative["error_rate<=1*stable"].alpha == pytest.approx(0.75 * 0.05 / 7)
    assert memory.rates["error_rate<=0.02"].alpha == pytest.approx(0.25 * 0.05 / 7)
    assert memory.latency["latency_p95~0.05"].median.alpha == pytest.approx(0.5 * 0.05 / 7)


def test_a_candidate_no_worse_than_a_stable_above_the_ceiling_is_reviewed_not_rolled_back() -> None:
    """Both at 1.5% hallucinations (ceiling 0.5%), equal checked answers per window, as in a
    shadow: the ceiling alone would roll back a candidate for stable's level."""
    level = role(hallucinations=3, correct=197)
    decisions, memory = [], None
    for _ in range(8):
        results, decision, memory = judge_sample(DEFAULT, WindowSample(level, level), memory)
        decisions.append(decision)
    assert Decision.FAIL not in decisions and decisions[-1] is Decision.REVIEW
    found = next(r for r in results if r.gate == "hallucination_rate")
    assert found.label is Label.REVIEW and "stable is above the ceiling too" in found.reason
    assert memory.rates["hallucination_rate<=0.005"].rejected


def test_memory_of_another_bound_restarts_the_test() -> None:
    # evidence gathered against another bound says nothing about this one
    memory = GateMemory.model_validate(
        {"rates": {"hallucination_rate<=0.005": {"bound": 0.5, "alpha": 0.05, "trials": 9000}}}
    )
    _, _, memory = judge_sample(DEFAULT, WindowSample(role(), role()), memory)
    state = memory.rates["hallucination_rate<=0.005"]
    assert (state.bound, state.trials) == (0.005, role().checked)


def test_a_corrupt_memory_is_refused_when_loaded() -> None:
    with pytest.raises(ValueError, match="bound"):
        GateMemory.model_validate({"rates": {"hallucination_rate<=0.005": {"bound": "lots"}}})


@pytest.mark.parametrize("name", ["default", "strict"])
def test_shipped_policies_load(name: str) -> None:
    policy = load_policy(POLICIES / f"{name}.yaml")
    assert isinstance(policy, GatePolicy)
    # satisfaction is opt-in: a shipped policy would find no ratings where users do not rate.
    assert {g.metric for g in policy.live} == set(LiveMetric) - {
        LiveMetric.SATISFACTION,
        LiveMetric.PROBE_ACCURACY,
    }


def test_default_policy_holds_the_seed_thresholds() -> None:
    gates = {g.metric: g for g in DEFAULT.live}
    assert gates[LiveMetric.LATENCY_P95].max_ratio == 1.2
    assert gates[LiveMetric.HALLUCINATION_RATE].max_rate == 0.005
    assert gates[LiveMetric.COST_PER_1K].severity is Severity.SOFT
    assert DEFAULT.min_samples == 30


def test_malformed_policy_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("live:\n  - metric: latency_p95\n    severity: hard\n    max_ratio: -1\n")
    with pytest.raises(PolicyError, match=r"live\.0\.max_ratio"):
        load_policy(path)


def test_store_window_end_to_end_fails_a_hallucinating_canary(tmp_path: Path) -> None:
    t0 = datetime(2026, 1, 12, 9, 0, tzinfo=UTC)
    rng = np.random.default_rng(21)

    def records(version: str, role: Role, bad_every: int) -> list[RequestRecord]:
        return [
            RequestRecord(
                request_id=f"{role}-{i}",
                at=t0 + timedelta(milliseconds=10 * i),
                service="svc",
                version=version,
                role=role,
                status=200,
                latency_ms=float(rng.uniform(40, 60)),
                cost_usd=0.001,
                checked=True,
                hallucination=bool(bad_every and i % bad_every == 0),
                unsafe=False,
            )
            for i in range(200)
        ]

    with Store(tmp_path / "records.db") as store:
        store.write(records("1", Role.STABLE, 0))
        store.write(records("2", Role.CANARY, 10))  # 10% hallucinations
        store.write(records("2", Role.SHADOW, 0))
        sample = StoreSource(store).window("svc", "1", "2", t0, t0 + timedelta(minutes=1))
    assert (sample.baseline.n, sample.candidate.n) == (200, 200)
    assert (sample.candidate.hallucinations, sample.candidate.facts) == (20, 200)
    results, decision, _ = judge_sample(DEFAULT, sample, None)
    assert decision is Decision.FAIL
    assert labels(results)["hallucination_rate"] is Label.FAIL
    assert labels(results)["accuracy"] is Label.REVIEW
    assert labels(results)["latency_p95"] is Label.PASS
