"""Policy -> GateResults -> Decision for one window: the judge, wiring only.

Observability is judged first, then every live gate of the policy; a gate that raises becomes
an ERROR result and the others are still judged. The rate gates' sequential states come in and
go out as plain JSON (keyed `metric<=bound`): the caller keeps them from window to window and
starts from `None` for every new candidate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from canaryflow.analysis import judges
from canaryflow.analysis.samples import WindowSample
from canaryflow.contracts import (
    Decision,
    GatePolicy,
    GateResult,
    Label,
    LiveGate,
    LiveMetric,
    combine,
)
from canaryflow.stats.sequential import SequentialState

State = dict[str, Any]
EffectJudge = Callable[[LiveGate, WindowSample, judges.JudgeConfig], GateResult]

EFFECT_JUDGES: dict[LiveMetric, EffectJudge] = {
    LiveMetric.LATENCY_P95: judges.latency_p95,
    LiveMetric.COST_PER_1K: judges.cost_per_1k,
    LiveMetric.ACCURACY: judges.accuracy,
}


def state_key(gate: LiveGate) -> str:
    return f"{gate.metric}<={gate.max_rate}"


def judge_gate(
    gate: LiveGate, sample: WindowSample, config: judges.JudgeConfig, state: State
) -> GateResult:
    """One gate; updates `state` in place for a rate gate."""
    if gate.metric in judges.RATE_METRICS:
        key = state_key(gate)
        previous = state.get(key)
        prior = None if previous is None else SequentialState.model_validate(previous)
        result, updated = judges.rate(gate, sample, config, prior)
        state[key] = updated.model_dump(mode="json")
        return result
    return EFFECT_JUDGES[gate.metric](gate, sample, config)


def judge_window(
    policy: GatePolicy, sample: WindowSample, state: State | None = None
) -> tuple[tuple[GateResult, ...], Decision, State]:
    """Every gate of `policy` on one window; returns (results, decision, the next state)."""
    config = judges.JudgeConfig.from_policy(policy)
    new_state: State = dict(state or {})
    results = [judges.observability(sample, config)]
    for gate in policy.live:
        try:
            results.append(judge_gate(gate, sample, config, new_state))
        except Exception as exc:  # a broken gate is an ERROR verdict, never a crash or a pass
            results.append(
                GateResult(
                    gate=gate.metric,
                    severity=gate.severity,
                    label=Label.ERROR,
                    reason=f"{type(exc).__name__}: {exc}",
                )
            )
    return tuple(results), combine(results), new_state
