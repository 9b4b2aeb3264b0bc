"""A release: its spec (plan, policy, approvals) and its record (stages, decision)."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Literal

from pydantic import Field, field_validator, model_validator

from canaryflow.contracts.base import Frozen, Percent, Seconds, Strict
from canaryflow.contracts.manifests import SignedManifest
from canaryflow.contracts.policy import GatePolicy
from canaryflow.contracts.schedule import PromotionWindow


class ShadowConfig(Strict):
    enabled: bool = True
    mirror_percent: Percent = 100.0
    duration_s: Seconds = 60.0
    window_s: Seconds = 15.0


class CanaryStep(Strict):
    weight: Percent
    windows: int = Field(1, ge=1)
    window_s: Seconds = 15.0


class CanaryPlan(Strict):
    steps: list[CanaryStep] = Field(
        default_factory=lambda: [CanaryStep(weight=1), CanaryStep(weight=3), CanaryStep(weight=5)]
    )
    max_extensions: int = Field(2, ge=0, description="extra windows when a window is inconclusive")
    late_records_s: Seconds = Field(
        0.0,
        description="before promoting, the candidate's requests that complete up to this long "
        "after the last window ended are judged against the hard gates; the worker's data plane "
        "timeout (`Endpoints.request_timeout_s`) is the floor: a spec may lengthen, never shorten",
    )

    @field_validator("steps")
    @classmethod
    def _weights_increase(cls, steps: list[CanaryStep]) -> list[CanaryStep]:
        weights = [s.weight for s in steps]
        if weights != sorted(weights):
            raise ValueError(f"canary weights must not decrease, got {weights}")
        return steps


class ApprovalConfig(Strict):
    timeout_s: Seconds = 3600.0
    default_action: Literal["approve", "reject"] = "reject"
    poll_s: float = Field(10.0, ge=1.0, description="how often the paused run checks for an answer")


class TrafficConfig(Strict):
    """Synthetic traffic the embedded stack drives during shadow and canary (demo, tests)."""

    rate_rps: float = Field(50.0, gt=0)
    corpus: str = "live"


class ReleaseSpec(Strict):
    service: str
    candidate: SignedManifest
    baseline_alias: str = "champion"
    suites: list[str] = Field(default_factory=lambda: ["golden", "regression", "safety"])
    sample_per_suite: int | None = Field(None, ge=1, description="stratified sample; None = all")
    shadow: ShadowConfig = ShadowConfig()
    canary: CanaryPlan = CanaryPlan()
    policy: GatePolicy = GatePolicy()
    approval: ApprovalConfig = ApprovalConfig()
    traffic: TrafficConfig | None = Field(
        None,
        description="synthetic load through Envoy, for the embedded stack only: off unless asked",
    )
    allow_incompatible: bool = False
    adapt_windows: bool = Field(
        False,
        description="when the service's recent traffic cannot fill a window with the gates' "
        "min_samples, lengthen that window instead of refusing the spec (preflight's plan)",
    )
    lock_wait_s: Seconds = Field(0.0, description="wait this long for another release, then refuse")
    promote_within: PromotionWindow | None = Field(
        None,
        description="promote to 100% only inside these hours; a release that passes outside "
        "them waits at its last canary weight, then re-judges one window; None: at once",
    )

    @model_validator(mode="after")
    def _candidate_belongs_to_service(self) -> ReleaseSpec:
        if self.candidate.manifest.service != self.service:
            raise ValueError(
                f"candidate {self.candidate.manifest.model_id!r} belongs to service "
                f"{self.candidate.manifest.service!r}, not {self.service!r}"
            )
        return self


class ApprovalDecision(Strict):
    """What a human answers at a soft gate (the Prefect UI form)."""

    approve: bool = False
    reason: str = ""
    approver: str = ""


class Stage(StrEnum):
    """The steps of the release runbook, in order."""

    PREFLIGHT = "preflight"
    PUBLISH = "publish"
    OFFLINE_EVAL = "offline_eval"
    SHADOW = "shadow"
    CANARY = "canary"
    PROMOTE = "promote"
    ROLLBACK = "rollback"
    RELEASE = "release"


class Outcome(StrEnum):
    PASSED = "passed"
    FAILED = "failed"
    REVIEW = "review"
    APPROVED = "approved"
    REJECTED = "rejected"
    SKIPPED = "skipped"
    DONE = "done"
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"
    WAITING = "waiting"


class ReleaseDecision(StrEnum):
    RUNNING = "running"
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"
    REJECTED = "rejected"


class StageOutcome(Frozen):
    """One line of the release's story; `key` names it in the ledger and in events."""

    stage: Stage
    part: str | None = Field(None, description="e.g. '5pct' for a canary step, 'approval'")
    outcome: Outcome
    detail: str = ""
    metrics: dict[str, float] = Field(default_factory=dict)
    at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @property
    def key(self) -> str:
        """`canary_5pct`, `shadow_approval`, `promote`: stable names for tags and events."""
        return f"{self.stage.value}_{self.part}" if self.part else self.stage.value


class Waiver(Frozen):
    """A human accepted these gates' findings for the rest of the release."""

    stage: Stage
    gates: tuple[str, ...]
    approver: str
    reason: str

    def describe(self) -> str:
        return f"{', '.join(self.gates)} ({self.approver}: {self.reason})"


class ReleaseRecord(Strict):
    release_id: str
    service: str
    candidate: str
    candidate_version: str | None = None
    baseline_version: str | None = None
    decision: ReleaseDecision = ReleaseDecision.RUNNING
    reason: str = ""
    stages: list[StageOutcome] = Field(default_factory=list)
    ledger_run_id: str | None = None
    breach_to_stable_ms: float | None = None
    waivers: list[Waiver] = Field(default_factory=list)

    def promote(self) -> None:
        """Promoted: the reason says which gate findings a human waived on the way, if any."""
        self.decision = ReleaseDecision.PROMOTED
        self.reason = "every gate passed"
        if self.waivers:
            waived = "; ".join(w.describe() for w in self.waivers)
            self.reason = f"promoted with {len(self.waivers)} waived gate finding(s): {waived}"
