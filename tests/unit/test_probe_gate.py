"""The `probe_accuracy` gate: Newcombe's interval on the shares of probes passed, its labels,
its pooling over the stage, and its place in a policy (opt-in, and only with a probes checker)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from canaryflow.analysis.gates import judge_sample
from canaryflow.analysis.judges import JudgeConfig
from canaryflow.analysis.probes import pooled_probes, probe_accuracy
from canaryflow.analysis.samples import RoleSample, WindowSample
from canaryflow.contracts import (
    Decision,
    GatePolicy,
    Label,
    LiveGate,
    LiveMetric,
    ProbesChecker,
    Role,
    Severity,
)

CONFIG = JudgeConfig(alpha=0.05, min_samples=30)
SOFT = LiveGate(metric=LiveMetric.PROBE_ACCURACY, severity=Severity.SOFT, margin=0.05)
HARD = SOFT.model_copy(update={"severity": Severity.HARD})
T0 = datetime(2026, 1, 12, 9, 0, tzinfo=UTC)


def window(baseline: tuple[int, int], candidate: tuple[int, int]) -> WindowSample:
    """(passed, probes) per role; users' requests are not what this gate reads."""
    return WindowSample(
        baseline=RoleSample(n=100, probes_passed=baseline[0], probes=baseline[1]),
        candidate=RoleSample(n=100, probes_passed=candidate[0], probes=candidate[1]),
    )


def test_too_few_probes_on_either_side_is_nodata() -> None:
    result = probe_accuracy(SOFT, window((29, 29), (200, 200)), CONFIG)
    assert result.label is Label.NODATA
    assert "scored probes" in result.reason
    assert (result.evidence.n_baseline, result.evidence.n_candidate) == (29, 200)


def test_an_equal_candidate_passes_with_counts_shares_and_interval() -> None:
    result = probe_accuracy(HARD, window((180, 200), (181, 200)), CONFIG)
    assert result.label is Label.PASS
    evidence = result.evidence
    assert (evidence.baseline, evidence.candidate) == (0.9, 0.905)
    assert evidence.ci_low is not None and evidence.ci_high is not None
    assert evidence.ci_low < 0 < evidence.ci_high
    assert evidence.detail["passed_candidate"] == 181
    assert evidence.threshold == -0.05


@pytest.mark.parametrize(("gate", "label"), [(SOFT, Label.REVIEW), (HARD, Label.FAIL)])
def test_a_candidate_that_fails_more_probes_breaches(gate: LiveGate, label: Label) -> None:
    result = probe_accuracy(gate, window((180, 200), (120, 200)), CONFIG)
    assert result.label is label
    assert result.reason.startswith("candidate fails more probes")
    assert result.evidence.ci_high is not None and result.evidence.ci_high < 0


def test_a_small_drop_inside_the_margin_is_not_a_breach() -> None:
    assert probe_accuracy(HARD, window((180, 200), (174, 200)), CONFIG).label is Label.PASS


def test_judged_only_when_named_and_only_with_a_probes_checker() -> None:
    sample = window((180, 200), (120, 200))
    assert LiveMetric.PROBE_ACCURACY not in {g.metric for g in GatePolicy().live}
    gates, _, _ = judge_sample(GatePolicy(), sample)
    assert "probe_accuracy" not in {g.gate for g in gates}
    with pytest.raises(ValidationError, match="needs probes"):
        GatePolicy(live=(HARD,))
    with pytest.raises(ValidationError, match="give margin"):
        LiveGate(metric=LiveMetric.PROBE_ACCURACY, severity=Severity.HARD, max_rate=0.1)
    policy = GatePolicy(live=(HARD,), checkers=(ProbesChecker(suite="golden"),))
    gates, decision, _ = judge_sample(policy, sample)
    assert [g.gate for g in gates] == ["observability", "probe_accuracy"]
    assert gates[1].label is Label.FAIL
    assert decision is Decision.FAIL


class FakeStore:
    """Probe records as (role, version, at, passed); counts as the store's query makes them."""

    def __init__(self, probes: list[tuple[Role, str, datetime, bool]]) -> None:
        self.probes = probes

    def probe_counts(
        self, service: str, role: Role, version: str, since: float, until: float
    ) -> tuple[int, int, float | None]:
        found = [
            (at.timestamp(), passed)
            for r, v, at, passed in self.probes
            if r is role and v == version and since <= at.timestamp() < until
        ]
        first = min((at for at, _ in found), default=None)
        return len(found), sum(p for _, p in found), first


def test_probes_are_pooled_since_the_candidates_first_probe_in_its_role() -> None:
    stage = T0 + timedelta(minutes=10)  # the canary stage began; shadow probes came before
    probes = [(Role.STABLE, "1", T0 + timedelta(seconds=s), True) for s in range(0, 900, 10)]
    probes += [(Role.SHADOW, "2", T0 + timedelta(seconds=s), True) for s in range(0, 600, 10)]
    probes += [(Role.CANARY, "2", stage + timedelta(seconds=s), s % 20 == 0)
               for s in range(0, 300, 10)]  # fmt: skip
    start, end = stage + timedelta(seconds=240), stage + timedelta(seconds=300)  # 5th window
    baseline, candidate = pooled_probes(FakeStore(probes), "svc", "1", "2", Role.CANARY, start, end)
    assert candidate == {"probes": 30, "probes_passed": 15}  # all five windows, canary only
    assert baseline == {"probes": 30, "probes_passed": 30}  # stable's since the same moment
    assert pooled_probes(object(), "svc", "1", "2", Role.CANARY, start, end) == ({}, {})
