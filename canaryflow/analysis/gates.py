"""Policy -> GateResults -> Decision for one window: the judge, wiring only.

Observability is judged first, then every live gate of the policy; a gate that raises becomes
an ERROR result and the others are still judged. The rate gates' sequential states come in and
go out as a `GateMemory` (keyed `metric<=bound`): the caller keeps it from window to window and
starts from an empty one for every new candidate.
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import Field

from canaryflow.analysis import judges
from canaryflow.analysis.samples import WindowSample
from canaryflow.analysis.satisfaction import satisfaction
from canaryflow.contracts import (
    Decision,
    Frozen,
    GatePolicy,
    GateResult,
    Label,
    LiveGate,
    LiveMetric,
    combine,
)
from canaryflow.stats.sequential import SequentialState


class GateMemory(Frozen):
    """What the judge remembers between windows of one stage: each rate gate's e-process."""

    rates: dict[str, SequentialState] = Field(default_factory=dict)


EffectJudge = Callable[[LiveGate, WindowSample, judges.JudgeConfig], GateResult]

EFFECT_JUDGES: dict[LiveMetric, EffectJudge] = {
    LiveMetric.LATENCY_P95: judges.latency_p95,
    LiveMetric.TTFT_P95: judges.ttft_p95,
    LiveMetric.COST_PER_1K: judges.cost_per_1k,
    LiveMetric.ACCURACY: judges.accuracy,
    LiveMetric.SATISFACTION: satisfaction,  # only when a policy names it
}


def state_key(gate: LiveGate) -> str:
    return f"{gate.metric}<={gate.max_rate}"


def judge_gate(
    gate: LiveGate,
    sample: WindowSample,
    config: judges.JudgeConfig,
    rates: dict[str, SequentialState],
) -> GateResult:
    """One gate; a rate gate's updated e-process goes into `rates`."""
    if gate.metric in judges.RATE_METRICS:
        key = state_key(gate)
        result, rates[key] = judges.rate(gate, sample, config, rates.get(key))
        return result
    return EFFECT_JUDGES[gate.metric](gate, sample, config)


def judge_sample(
    policy: GatePolicy, sample: WindowSample, memory: GateMemory | None = None
) -> tuple[tuple[GateResult, ...], Decision, GateMemory]:
    """Every gate of `policy` on one window's sample; returns (results, decision, new memory)."""
    config = judges.JudgeConfig.from_policy(policy)
    rates = dict(memory.rates) if memory else {}
    results = [judges.observability(sample, config)]
    for gate in policy.live:
        try:
            results.append(judge_gate(gate, sample, config, rates))
        except Exception as exc:  # a broken gate is an ERROR verdict, never a crash or a pass
            results.append(
                GateResult(
                    gate=gate.metric,
                    severity=gate.severity,
                    label=Label.ERROR,
                    reason=f"{type(exc).__name__}: {exc}",
                )
            )
    return tuple(results), combine(results), GateMemory(rates=rates)
