"""Policy -> GateResults -> Decision for one window: the judge, wiring only.

Observability is judged first, then every live gate of the policy; a gate that raises becomes
an ERROR result and the others are still judged. The policy's alpha is one budget per release,
split evenly across its live gates (`JudgeConfig.from_policy`). The sequential gates' states
come in and go out as a `GateMemory`: the caller keeps it from window to window, and from the
shadow stage through the last canary step, so every look at one candidate spends one budget;
it starts from an empty one for every new candidate. A policy's PromQL gates (`analysis.promql`)
are judged after the live gates when the caller gives a `PromQLTarget`; without one they are
NODATA saying to set prometheus_url, never skipped.
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import Field

from canaryflow.analysis import judges
from canaryflow.analysis.latency import LatencyState, latency
from canaryflow.analysis.probes import probe_accuracy
from canaryflow.analysis.promql import PromQLTarget, judge_promql
from canaryflow.analysis.rates import RateStates, rate, start_states
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
from canaryflow.contracts.policy import LATENCY_METRICS
from canaryflow.stats.anytime import ShareState
from canaryflow.stats.sequential import SequentialState


class GateMemory(Frozen):
    """What the judge remembers between windows: each sequential gate's e-processes.

    Plain JSON (`model_dump` / `model_validate`). `rates`: the candidate's ceiling test per
    rate gate (keyed `metric<=bound`), `stable_rates` stable's under the same key, `relative`
    the candidate-vs-stable test (keyed `metric<=ratio*stable`), `latency` the rank and tail
    tests per latency gate (keyed `metric~tolerance`). A state run for another bound, ratio,
    tolerance or alpha is restarted, never reused.
    """

    rates: dict[str, SequentialState] = Field(default_factory=dict)
    stable_rates: dict[str, SequentialState] = Field(default_factory=dict)
    relative: dict[str, ShareState] = Field(default_factory=dict)
    latency: dict[str, LatencyState] = Field(default_factory=dict)


EffectJudge = Callable[[LiveGate, WindowSample, judges.JudgeConfig], GateResult]

EFFECT_JUDGES: dict[LiveMetric, EffectJudge] = {
    LiveMetric.COST_PER_1K: judges.cost_per_1k,
    LiveMetric.ACCURACY: judges.accuracy,
    LiveMetric.SATISFACTION: satisfaction,  # only when a policy names it
    LiveMetric.PROBE_ACCURACY: probe_accuracy,  # only when a policy names it
}


def state_key(gate: LiveGate) -> str:
    return f"{gate.metric}<={gate.max_rate}"


def relative_key(gate: LiveGate) -> str:
    return f"{gate.metric}<={gate.rate_ratio:g}*stable"


def latency_key(gate: LiveGate) -> str:
    return f"{gate.metric}~{gate.latency_tolerance:g}"


class _Memory:
    """GateMemory's dicts, mutable while one window is judged."""

    def __init__(self, memory: GateMemory | None) -> None:
        memory = memory or GateMemory()
        self.rates = dict(memory.rates)
        self.stable_rates = dict(memory.stable_rates)
        self.relative = dict(memory.relative)
        self.latency = dict(memory.latency)

    def rate_states(self, gate: LiveGate, config: judges.JudgeConfig) -> RateStates:
        """The gate's states so far; a fresh test for any part not yet run."""
        fresh = start_states(gate, config)
        key = state_key(gate)
        return RateStates(
            candidate=self.rates.get(key, fresh.candidate),
            baseline=self.stable_rates.get(key, fresh.baseline),
            relative=self.relative.get(relative_key(gate), fresh.relative),
        )

    def frozen(self) -> GateMemory:
        return GateMemory(
            rates=self.rates,
            stable_rates=self.stable_rates,
            relative=self.relative,
            latency=self.latency,
        )


def judge_gate(
    gate: LiveGate, sample: WindowSample, config: judges.JudgeConfig, memory: _Memory
) -> GateResult:
    """One gate; a sequential gate's updated states go into `memory`."""
    if gate.metric in judges.RATE_METRICS:
        result, states = rate(gate, sample, config, memory.rate_states(gate, config))
        memory.rates[state_key(gate)] = states.candidate
        memory.stable_rates[state_key(gate)] = states.baseline
        memory.relative[relative_key(gate)] = states.relative
        return result
    if gate.metric in LATENCY_METRICS:
        key = latency_key(gate)
        result, memory.latency[key] = latency(gate, sample, config, memory.latency.get(key))
        return result
    return EFFECT_JUDGES[gate.metric](gate, sample, config)


def judge_sample(
    policy: GatePolicy,
    sample: WindowSample,
    memory: GateMemory | None = None,
    *,
    promql: PromQLTarget | None = None,
) -> tuple[tuple[GateResult, ...], Decision, GateMemory]:
    """Every gate of `policy` on one window's sample; returns (results, decision, new memory).

    `promql`: where the policy's PromQL gates are queried (`promql.prometheus_target`)."""
    config = judges.JudgeConfig.from_policy(policy)
    states = _Memory(memory)
    results = [judges.observability(sample, config)]
    for gate in policy.live:
        try:
            results.append(judge_gate(gate, sample, config, states))
        except Exception as exc:  # a broken gate is an ERROR verdict, never a crash or a pass
            results.append(
                GateResult(
                    gate=gate.metric,
                    severity=gate.severity,
                    label=Label.ERROR,
                    reason=f"{type(exc).__name__}: {exc}",
                )
            )
    if policy.promql:
        results.extend(
            judge_promql(policy.promql, promql, sample.start, sample.end, sample.candidate_role)
        )
    return tuple(results), combine(results), states.frozen()
