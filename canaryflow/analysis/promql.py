"""PromQL gates: a policy's queries over the team's own Prometheus series, judged per window.

Fetching and deciding are apart, as in Kayenta: a `ValueSource` (`PrometheusSource.instant`)
answers each rendered query with one value or the reason it has none, and `PromQLGate.judge`
turns those answers into a verdict without I/O. No value is the observability tier, whatever the
gate's severity: Prometheus unreachable, a query error or timeout, an empty result, several
series or NaN all give NODATA (observability), so a window without its numbers is never a pass.
The thresholds are plain bounds (Flagger's thresholdRange), not statistical tests: they spend
none of the policy's alpha.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from canaryflow.contracts import Evidence, GateResult, Label, Severity
from canaryflow.contracts.policy import PromQLGateSpec
from canaryflow.contracts.promql import render

NO_PROMETHEUS = (
    "no Prometheus to query: set prometheus_url in the stack's endpoints (`canaryflow up` "
    "sets it for the embedded Prometheus)"
)


@dataclass(frozen=True)
class Fetched:
    """One instant query's answer: `value`, or `problem` saying why there is none."""

    query: str
    value: float | None = None
    problem: str | None = None


class ValueSource(Protocol):
    """Answers one PromQL query at one moment; never raises (a failure is a `problem`)."""

    def instant(self, promql: str, at: datetime) -> Fetched: ...


@dataclass(frozen=True)
class PromQLTarget:
    """What a window's PromQL gates measure, and where; `source` None: none configured."""

    service: str
    stable: str
    candidate: str
    source: ValueSource | None


class PromQLGate:
    """One policy entry: renders its queries, then decides from the fetched values."""

    def __init__(self, spec: PromQLGateSpec) -> None:
        self.spec = spec

    def queries(self, target: PromQLTarget, role: str, window_s: float) -> tuple[str, str | None]:
        """The candidate's query, and stable's when the gate compares the two."""
        values = {"service": target.service, "version": target.candidate, "role": role}
        candidate = render(self.spec.query, values, window_s)
        if self.spec.max_ratio is None:
            return candidate, None
        stable = {"service": target.service, "version": target.stable, "role": "stable"}
        return candidate, render(self.spec.query, stable, window_s)

    def nodata(self, reason: str, detail: dict[str, float | int | str] | None = None) -> GateResult:
        return GateResult(
            gate=self.spec.gate,
            severity=Severity.OBSERVABILITY,
            label=Label.NODATA,
            reason=reason,
            evidence=Evidence(threshold=self._threshold(), detail=detail or {}),
        )

    def judge(self, candidate: Fetched, stable: Fetched | None = None) -> GateResult:
        """The verdict from fetched values (pure: the same answers give the same verdict)."""
        detail: dict[str, float | int | str] = {"query": candidate.query, **self._bounds()}
        if stable is not None:
            detail["stable_query"] = stable.query
        for role, fetched in (("candidate", candidate), ("stable", stable)):
            if fetched is not None and (fetched.value is None or math.isnan(fetched.value)):
                problem = fetched.problem or "the query's value is NaN"
                return self.nodata(f"{role} query: {problem}", {**detail, "problem": problem})
        assert candidate.value is not None
        if self.spec.max_ratio is None:
            return self._bounded(candidate.value, detail)
        if stable is None or stable.value is None:
            raise ValueError(f"gate {self.spec.gate} compares with stable: fetch stable's value")
        return self._ratio(candidate.value, stable.value, detail)

    def _bounded(self, value: float, detail: dict[str, float | int | str]) -> GateResult:
        spec = self.spec
        above = spec.max is not None and value > spec.max
        below = spec.min is not None and value < spec.min
        if above:
            reason = f"{spec.name} {value:.6g} above max {spec.max:g}"
        elif below:
            reason = f"{spec.name} {value:.6g} below min {spec.min:g}"
        else:
            reason = f"{spec.name} {value:.6g} within {self._range()}"
        return self._result(above or below, reason, Evidence(candidate=value, detail=detail))

    def _ratio(
        self, candidate: float, stable: float, detail: dict[str, float | int | str]
    ) -> GateResult:
        limit = self.spec.max_ratio
        assert limit is not None
        name = self.spec.name
        if stable < 0 or candidate < 0:
            return self.nodata(
                f"{name}: a ratio needs values >= 0, got candidate {candidate:.6g}, stable "
                f"{stable:.6g}",
                detail,
            )
        if stable == 0:
            worse = candidate > 0
            reason = f"{name}: stable 0, candidate {candidate:.6g}" + (
                " (any value is an unbounded ratio)" if worse else ": no change"
            )
            ratio = math.inf if worse else 1.0
        else:
            ratio = candidate / stable
            verb = "above" if ratio > limit else "within"
            reason = (
                f"{name}: candidate {candidate:.6g} / stable {stable:.6g} = {ratio:.4g}, "
                f"{verb} max_ratio {limit:g}"
            )
            worse = ratio > limit
        evidence = Evidence(
            baseline=stable,
            candidate=candidate,
            estimate=ratio if math.isfinite(ratio) else None,
            detail=detail,
        )
        return self._result(worse, reason, evidence)

    def _result(self, breached: bool, reason: str, evidence: Evidence) -> GateResult:
        soft = self.spec.severity is Severity.SOFT
        label = (Label.REVIEW if soft else Label.FAIL) if breached else Label.PASS
        evidence = evidence.model_copy(update={"threshold": self._threshold()})
        return GateResult(
            gate=self.spec.gate, severity=self.spec.severity, label=label, reason=reason,
            evidence=evidence,
        )  # fmt: skip

    def _threshold(self) -> float | None:
        spec = self.spec
        return next((x for x in (spec.max_ratio, spec.max, spec.min) if x is not None), None)

    def _bounds(self) -> dict[str, float | int | str]:
        spec = self.spec
        given = {"max": spec.max, "min": spec.min, "max_ratio": spec.max_ratio}
        return {k: v for k, v in given.items() if v is not None}

    def _range(self) -> str:
        lo = "-inf" if self.spec.min is None else f"{self.spec.min:g}"
        hi = "+inf" if self.spec.max is None else f"{self.spec.max:g}"
        return f"[{lo}, {hi}]"


def judge_promql(
    specs: Sequence[PromQLGateSpec],
    target: PromQLTarget | None,
    start: datetime | None,
    end: datetime | None,
    role: str | None,
) -> list[GateResult]:
    """Every PromQL gate on the window [start, end]: instant queries at its end."""
    results = []
    for spec in specs:
        gate = PromQLGate(spec)
        if target is None or target.source is None:
            results.append(gate.nodata(NO_PROMETHEUS))
            continue
        if start is None or end is None:
            results.append(gate.nodata("the window has no start and end to query at"))
            continue
        try:
            candidate_q, stable_q = gate.queries(
                target, role or "canary", (end - start).total_seconds()
            )
        except ValueError as exc:  # a value too long to render: never a pass
            results.append(gate.nodata(f"query not rendered: {exc}"))
            continue
        candidate = target.source.instant(candidate_q, end)
        stable = None if stable_q is None else target.source.instant(stable_q, end)
        results.append(gate.judge(candidate, stable))
    return results


def prometheus_target(
    prometheus_url: str | None, service: str, stable: str, candidate: str
) -> PromQLTarget:
    """The target for a stack's endpoints: no URL gives a target that says to set one."""
    source: ValueSource | None = None
    if prometheus_url:
        from canaryflow.analysis.sources import PrometheusSource

        source = PrometheusSource(prometheus_url)
    return PromQLTarget(service=service, stable=stable, candidate=candidate, source=source)
