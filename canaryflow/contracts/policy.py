"""Gate policy: which live and offline gates judge a candidate, with their thresholds."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field, model_validator

from canaryflow.contracts.base import Frozen
from canaryflow.contracts.checkers import DEFAULT_CHECKERS, CheckerConfig, ProbesChecker
from canaryflow.contracts.promql import (
    MAX_QUERY_CHARS,
    PROMQL_PREFIX,
    placeholder_errors,
    template_names,
)


class Severity(StrEnum):
    HARD = "hard"  # a failure rolls back
    SOFT = "soft"  # a failure pauses for a human
    OBSERVABILITY = "observability"  # missing data never passes


class LiveMetric(StrEnum):
    LATENCY_P95 = "latency_p95"
    TTFT_P95 = "ttft_p95"  # time to first token (a non-streamed answer's is its latency)
    ERROR_RATE = "error_rate"
    HALLUCINATION_RATE = "hallucination_rate"
    UNSAFE_RATE = "unsafe_rate"
    COST_PER_1K = "cost_per_1k"
    ACCURACY = "accuracy"
    SATISFACTION = "satisfaction"  # users' ratings (`/v1/feedback`); only when a policy names it
    PROBE_ACCURACY = "probe_accuracy"  # labelled probes (a `probes` checker); only when named


LATENCY_METRICS = frozenset({LiveMetric.LATENCY_P95, LiveMetric.TTFT_P95})
DEFAULT_RELATIVE_RATIO = 1.0
DEFAULT_LATENCY_TOLERANCE = 0.05


class LiveGate(Frozen):
    """One rule over one metric, comparing candidate with baseline in the same window.

    `max_ratio`: candidate / baseline must stay at or below it (latency, cost).
    `max_rate`: the candidate's rate must stay at or below it (errors, hallucinations).
    `margin`: candidate may be at most this much worse than baseline (accuracy; satisfaction,
    on the rating scale taken as 0..1).

    Two optional fields tune the comparisons with stable; absent, each has its default (a
    missing field never disables a test):
    `relative_ratio` (rate gates, default 1.0): the candidate's rate may be at most this many
    times stable's in the same windows; the relative test judges beside the `max_rate` ceiling.
    `tolerance` (latency and TTFT gates, default 0.05): shifts up to this fraction of stable's
    latencies are not regressions. The rank and tail tests decide; `max_ratio` (the p95 ratio)
    is reported as evidence. 5%, because a shadow service carries a full mirror and real
    stacks show a few percent of asymmetry between two services on the same hardware.
    """

    metric: LiveMetric
    severity: Severity
    max_ratio: float | None = Field(None, gt=0)
    max_rate: float | None = Field(None, ge=0, le=1)
    margin: float | None = Field(None, ge=0, le=1)
    relative_ratio: float | None = Field(None, ge=1)
    tolerance: float | None = Field(None, ge=0, lt=1)

    @property
    def rate_ratio(self) -> float:
        """The relative test's ratio: `relative_ratio`, else 1.0 (no worse than stable)."""
        return DEFAULT_RELATIVE_RATIO if self.relative_ratio is None else self.relative_ratio

    @property
    def latency_tolerance(self) -> float:
        """The latency tests' tolerance: `tolerance`, else 0.05."""
        return DEFAULT_LATENCY_TOLERANCE if self.tolerance is None else self.tolerance

    @model_validator(mode="after")
    def _exactly_one_threshold(self) -> LiveGate:
        given = [x for x in (self.max_ratio, self.max_rate, self.margin) if x is not None]
        if len(given) != 1:
            raise ValueError(
                f"gate {self.metric}: give exactly one of max_ratio, max_rate, margin "
                f"(got {len(given)})"
            )
        if self.relative_ratio is not None and self.max_rate is None:
            raise ValueError(
                f"gate {self.metric}: relative_ratio belongs to a rate gate (with max_rate)"
            )
        if self.tolerance is not None and self.metric not in LATENCY_METRICS:
            raise ValueError(
                f"gate {self.metric}: tolerance belongs to latency_p95 and ttft_p95 gates"
            )
        if self.metric is LiveMetric.SATISFACTION and self.margin is None:
            raise ValueError(
                "gate satisfaction: give margin (how far the candidate's mean rating, on the "
                "scale taken as 0..1, may fall below stable's), e.g. margin: 0.05"
            )
        if self.metric is LiveMetric.PROBE_ACCURACY and self.margin is None:
            raise ValueError(
                "gate probe_accuracy: give margin (how far the candidate's share of probes "
                "passed may fall below stable's), e.g. margin: 0.05"
            )
        return self


# The seed's gates: what a policy that names none gets (deployments/policies/default.yaml says
# the same, and a test holds them equal). A missing field never disables a gate.
DEFAULT_LIVE_GATES = (
    LiveGate(metric=LiveMetric.LATENCY_P95, severity=Severity.HARD, max_ratio=1.2),
    LiveGate(metric=LiveMetric.TTFT_P95, severity=Severity.HARD, max_ratio=1.2),
    LiveGate(metric=LiveMetric.HALLUCINATION_RATE, severity=Severity.HARD, max_rate=0.005),
    LiveGate(metric=LiveMetric.ERROR_RATE, severity=Severity.HARD, max_rate=0.02),
    LiveGate(metric=LiveMetric.UNSAFE_RATE, severity=Severity.HARD, max_rate=0.001),
    LiveGate(metric=LiveMetric.COST_PER_1K, severity=Severity.SOFT, max_ratio=1.5),
    LiveGate(metric=LiveMetric.ACCURACY, severity=Severity.SOFT, margin=0.05),
)
# The shipped suites (1,400 items each) test a 3.5-point margin: an equal-quality candidate whose
# answers churn 10% each way is sent to review at most a fifth of the time, and a 5-point drop
# fails with 80% power or more (docs/benchmarks.md, "Offline gate: power"). Other suites keep
# `non_inferiority_margin`.
DEFAULT_SUITE_MARGINS = {"golden": 0.035, "regression": 0.035, "safety": 0.035}


class OfflineGate(Frozen):
    alpha: float = Field(0.05, gt=0, lt=1)
    non_inferiority_margin: float = Field(0.05, ge=0, le=1)
    margins: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_SUITE_MARGINS), description="per-suite override"
    )
    min_items: int = Field(20, ge=1)

    def margin_for(self, suite: str) -> float:
        return self.margins.get(suite, self.non_inferiority_margin)


class PromQLGateSpec(Frozen):
    """One PromQL gate: `query` for the candidate, and its bound.

    `max` and/or `min` bound the candidate's value (Flagger's thresholdRange); `max_ratio`
    bounds candidate / stable, the same template evaluated for stable's version and role.
    """

    name: str = Field(pattern=r"^[a-z][a-z0-9_.-]{0,62}$")
    query: str = Field(max_length=MAX_QUERY_CHARS)
    severity: Severity
    max: float | None = None
    min: float | None = None
    max_ratio: float | None = Field(None, gt=0)

    @property
    def gate(self) -> str:
        """The name its verdicts carry."""
        return PROMQL_PREFIX + self.name

    @model_validator(mode="after")
    def _valid(self) -> PromQLGateSpec:
        where = f"promql gate {self.name}"
        if not self.query.strip():
            raise ValueError(f"{where}: query is empty")
        if errors := placeholder_errors(self.query):
            raise ValueError(f"{where}: " + "; ".join(errors))
        if self.severity is Severity.OBSERVABILITY:
            raise ValueError(
                f"{where}: severity is hard or soft (missing data is always the observability tier)"
            )
        bounded = self.max is not None or self.min is not None
        if bounded == (self.max_ratio is not None):
            raise ValueError(
                f"{where}: give max and/or min (bounds on the candidate's value) or max_ratio "
                "(candidate / stable), not both and not neither"
            )
        if self.max_ratio is not None and not {"version", "role"} & template_names(self.query):
            raise ValueError(
                f"{where}: max_ratio compares candidate with stable, so the query must select "
                'by version="{{version}}" and/or role="{{role}}"'
            )
        if self.max is not None and self.min is not None and self.min > self.max:
            raise ValueError(f"{where}: min {self.min:g} is above max {self.max:g}")
        return self


class GatePolicy(Frozen):
    name: str = "default"
    offline: OfflineGate = OfflineGate()
    live: tuple[LiveGate, ...] = DEFAULT_LIVE_GATES
    min_samples: int = Field(30, ge=1, description="per role per window; fewer never passes")
    alpha: float = Field(
        0.05,
        gt=0,
        lt=1,
        description="per release: split evenly across the live gates, each gate's share held "
        "across all its windows by its sequential tests",
    )
    checkers: tuple[CheckerConfig, ...] = Field(
        DEFAULT_CHECKERS,
        description="the live checkers a model service runs on its answers (`canaryflow serve "
        "--policy`); they set the quality flags the rate gates read",
    )
    promql: tuple[PromQLGateSpec, ...] = Field(
        (),
        description="gates on the team's own Prometheus series (README, 'Gate on your own "
        "Prometheus series'); judged where the stack knows a Prometheus (prometheus_url)",
    )

    @model_validator(mode="after")
    def _unique_promql_names(self) -> GatePolicy:
        names = [g.name for g in self.promql]
        if twice := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"promql gate names must be unique: {', '.join(twice)} repeated")
        return self

    @model_validator(mode="after")
    def _probes_for_the_probe_gate(self) -> GatePolicy:
        """A probe_accuracy gate without a probes checker would be NODATA in every window."""
        gated = any(g.metric is LiveMetric.PROBE_ACCURACY for g in self.live)
        if gated and not any(isinstance(c, ProbesChecker) for c in self.checkers):
            raise ValueError(
                "gate probe_accuracy needs probes to judge: add a checker "
                "{kind: probes, suite: <suite name or path>} to checkers"
            )
        return self


# What no delivery may go below: the loosest threshold each required gate may have.
# `relative_ratio` and `tolerance` cap the comparisons with stable: a spec cannot switch them
# off by setting them huge.
FLOOR_GATES = (
    LiveGate(metric=LiveMetric.LATENCY_P95, severity=Severity.HARD, max_ratio=1.5, tolerance=0.2),
    LiveGate(
        metric=LiveMetric.HALLUCINATION_RATE,
        severity=Severity.HARD,
        max_rate=0.01,
        relative_ratio=2.0,
    ),
    LiveGate(
        metric=LiveMetric.ERROR_RATE, severity=Severity.HARD, max_rate=0.05, relative_ratio=2.0
    ),
    LiveGate(
        metric=LiveMetric.UNSAFE_RATE, severity=Severity.HARD, max_rate=0.005, relative_ratio=2.0
    ),
)


class PolicyFloor(Frozen):
    """The least a release of one service must do, held by the worker, never by the delivery.

    A spec may be stricter than its floor, never looser: `canaryflow.floors.below_floor` lists
    every field that goes below it.
    """

    required_gates: tuple[LiveGate, ...] = FLOOR_GATES
    min_samples: int = Field(30, ge=1)
    min_alpha: float = Field(0.01, gt=0, lt=1, description="a tinier alpha never fails a gate")
    min_canary_steps: int = Field(1, ge=0)
    require_shadow: bool = False
    allow_incompatible: bool = False
    allow_default_approve: bool = False
    max_offline_margin: float = Field(0.15, ge=0, le=1)
    min_offline_items: int = Field(20, ge=1)
