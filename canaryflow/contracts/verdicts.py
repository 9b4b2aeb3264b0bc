"""Verdicts: per-gate labels and evidence, offline reports, window results."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import Field

from canaryflow.contracts.base import Frozen
from canaryflow.contracts.policy import Severity


class Label(StrEnum):
    """Per-gate result, Kayenta-style: edge cases (no data, errors) are labels, not crashes."""

    PASS = "pass"
    FAIL = "fail"
    REVIEW = "review"
    NODATA = "nodata"
    ERROR = "error"


class Decision(StrEnum):
    """What a stage or window tells the flow to do next."""

    PASS = "pass"
    FAIL = "fail"
    REVIEW = "review"
    INCONCLUSIVE = "inconclusive"


class Evidence(Frozen):
    n_baseline: int = 0
    n_candidate: int = 0
    baseline: float | None = None
    candidate: float | None = None
    estimate: float | None = Field(None, description="effect: difference, ratio or shift")
    ci_low: float | None = None
    ci_high: float | None = None
    p_value: float | None = None
    threshold: float | None = None
    detail: dict[str, float | int | str] = Field(default_factory=dict)


class GateResult(Frozen):
    gate: str
    severity: Severity
    label: Label
    reason: str
    evidence: Evidence = Evidence()


def combine(results: list[GateResult] | tuple[GateResult, ...]) -> Decision:
    """Hard/observability failure -> FAIL; soft failure -> REVIEW; missing data -> INCONCLUSIVE.

    Missing data extends the window only where it could hide a rollback (hard and observability
    gates); a soft gate without data has nothing for a human to review and stays visible as
    NODATA in the evidence.
    """
    bad = {Label.FAIL, Label.ERROR}
    if any(r.label in bad and r.severity is not Severity.SOFT for r in results):
        return Decision.FAIL
    if any(r.label is Label.NODATA and r.severity is not Severity.SOFT for r in results):
        return Decision.INCONCLUSIVE
    if any(r.label in bad | {Label.REVIEW} for r in results):
        return Decision.REVIEW
    return Decision.PASS


class SuiteComparison(Frozen):
    suite: str
    n: int
    baseline_pass: int
    candidate_pass: int
    baseline_rate: float
    candidate_rate: float
    baseline_ci: tuple[float, float]
    candidate_ci: tuple[float, float]
    only_baseline: int = Field(description="McNemar b: baseline passed, candidate failed")
    only_candidate: int = Field(description="McNemar c: candidate passed, baseline failed")
    mcnemar_p: float
    diff: float
    diff_ci: tuple[float, float]
    margin: float
    result: GateResult


class EvalItemResult(Frozen):
    suite: str
    item_id: str
    kind: str
    baseline_passed: bool
    candidate_passed: bool
    baseline_output: str
    candidate_output: str
    unscored: str | None = Field(
        None,
        description="why the pair could not be scored (a judge or embeddings call failed); "
        "such a pair is left out of the suite's comparison, never counted as a pass",
    )


class EvalReport(Frozen):
    candidate: str
    baseline: str
    suites: tuple[SuiteComparison, ...]
    decision: Decision
    items: tuple[EvalItemResult, ...] = ()
    tokens: int = 0
    cost_usd: float = 0.0
    seconds: float = 0.0
    cached: int = 0

    @property
    def unsure(self) -> tuple[str, ...]:
        """The suites that did not pass: what a reviewer is asked about."""
        return tuple(s.suite for s in self.suites if s.result.label is not Label.PASS)

    def findings(self) -> str:
        return "; ".join(s.result.reason for s in self.suites if s.result.label is not Label.PASS)

    def headline(self) -> str:
        worst = min(self.suites, key=lambda s: s.diff, default=None)
        detail = f" (worst: {worst.suite} {worst.diff * 100:+.1f} pts)" if worst else ""
        return f"non-inferior on {len(self.suites)} suites{detail}"


class WindowResult(Frozen):
    stage: Literal["shadow", "canary"]
    step: int
    weight: float
    window: int
    started_at: datetime
    ended_at: datetime
    gates: tuple[GateResult, ...]
    decision: Decision
    requests: dict[str, int] = Field(default_factory=dict, description="by role")
