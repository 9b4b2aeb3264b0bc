"""The pydantic models every layer shares.

Data crosses every boundary (core -> tasks -> flows, registry, ledger, data plane) as these
models. They validate on the way in, so a bad manifest or spec fails at load time with the
field and the reason, never halfway through a release.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MODEL_ID_PATTERN = re.compile(
    r"^(?P<app>[a-z0-9][a-z0-9-]*)/(?P<model>[a-z0-9][a-z0-9._-]*?)"
    r"-v(?P<version>\d+\.\d+(?:\.\d+)?)\+(?P<dataset>[a-z0-9][a-z0-9-]*)$"
)
Percent = Annotated[float, Field(ge=0.0, le=100.0)]
Seconds = Annotated[float, Field(ge=0.0)]


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def canonical_json(data: Any) -> str:
    """Sorted keys, no spaces, UTF-8: the same object always hashes the same."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------- manifest


class ModelId(Frozen):
    """`my-assistant/gemini-docs-v1.2+ds-20260112` split into its parts."""

    app: str
    model: str
    version: str
    dataset: str

    @classmethod
    def parse(cls, text: str) -> ModelId:
        match = MODEL_ID_PATTERN.match(text)
        if match is None:
            raise ValueError(
                f"model id {text!r} must look like 'app/model-vMAJOR.MINOR[.PATCH]+dataset', "
                "e.g. 'my-assistant/gemini-docs-v1.2+ds-20260112'"
            )
        return cls(**match.groupdict())


class Origin(Frozen):
    provider: str = Field(description="provider key in settings, e.g. 'sandbox', 'gemini'")
    model: str = Field(description="the provider's own model name")


class DecodingParameters(Frozen):
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(256, ge=1, le=32768)
    seed: int | None = None
    stop: tuple[str, ...] = ()


class Price(Frozen):
    """USD per 1,000 tokens."""

    input_per_1k: float = Field(ge=0.0)
    output_per_1k: float = Field(ge=0.0)

    def cost(self, tokens_in: int, tokens_out: int) -> float:
        return tokens_in / 1000 * self.input_per_1k + tokens_out / 1000 * self.output_per_1k


class ModelManifest(Frozen):
    """An immutable, signable description of one model release."""

    model_id: str
    created_at: datetime
    origin: Origin
    adapter_uri: str | None = None
    prompt_template: str = Field(description="rendered with str.format(input=...)")
    prompt_template_hash: str | None = Field(
        None, description="sha256 of the template; filled in when absent, checked when given"
    )
    parameters: DecodingParameters = DecodingParameters()
    tokenizer_version: str
    embedding_version: str
    fine_tune_seed: int | None = None
    eval_uri: str | None = None
    license: str
    allowed_uses: tuple[str, ...] = ("commercial",)
    data_residency: tuple[str, ...] = ()
    price: Price

    @field_validator("model_id")
    @classmethod
    def _model_id_is_well_formed(cls, value: str) -> str:
        ModelId.parse(value)
        return value

    @field_validator("prompt_template")
    @classmethod
    def _template_takes_input(cls, value: str) -> str:
        if "{input}" not in value:
            raise ValueError("prompt_template must contain the placeholder '{input}'")
        return value

    @model_validator(mode="after")
    def _template_hash_matches(self) -> ModelManifest:
        actual = sha256_hex(self.prompt_template)
        if self.prompt_template_hash is None:
            object.__setattr__(self, "prompt_template_hash", actual)
        elif self.prompt_template_hash != actual:
            raise ValueError(
                "prompt_template_hash does not match prompt_template: "
                "remove the hash to have it computed, or restore the template"
            )
        return self

    @property
    def id(self) -> ModelId:
        return ModelId.parse(self.model_id)

    @property
    def service(self) -> str:
        return self.id.app

    def canonical(self) -> str:
        return canonical_json(self.model_dump(mode="json"))

    def digest(self) -> str:
        """sha256 of the canonical JSON: what is signed and what publishing is idempotent on."""
        return sha256_hex(self.canonical())

    def render(self, user_input: str) -> str:
        return self.prompt_template.replace("{input}", user_input)


class Signature(Frozen):
    algorithm: Literal["ed25519"] = "ed25519"
    key_id: str = Field(description="sha256 of the raw public key, first 16 hex digits")
    value: str = Field(description="base64 signature over the manifest digest")


class SignedManifest(Frozen):
    manifest: ModelManifest
    signature: Signature


# --------------------------------------------------------------------------- policy


class Severity(StrEnum):
    HARD = "hard"  # a failure rolls back
    SOFT = "soft"  # a failure pauses for a human
    OBSERVABILITY = "observability"  # missing data never passes


class LiveMetric(StrEnum):
    LATENCY_P95 = "latency_p95"
    ERROR_RATE = "error_rate"
    HALLUCINATION_RATE = "hallucination_rate"
    UNSAFE_RATE = "unsafe_rate"
    COST_PER_1K = "cost_per_1k"
    ACCURACY = "accuracy"


class LiveGate(Frozen):
    """One rule over one metric, comparing candidate with baseline in the same window.

    `max_ratio`: candidate / baseline must stay at or below it (latency, cost).
    `max_rate`: the candidate's rate must stay at or below it (errors, hallucinations).
    `margin`: candidate may be at most this much worse than baseline (accuracy).
    """

    metric: LiveMetric
    severity: Severity
    max_ratio: float | None = Field(None, gt=0)
    max_rate: float | None = Field(None, ge=0, le=1)
    margin: float | None = Field(None, ge=0, le=1)

    @model_validator(mode="after")
    def _exactly_one_threshold(self) -> LiveGate:
        given = [x for x in (self.max_ratio, self.max_rate, self.margin) if x is not None]
        if len(given) != 1:
            raise ValueError(
                f"gate {self.metric}: give exactly one of max_ratio, max_rate, margin "
                f"(got {len(given)})"
            )
        return self


class OfflineGate(Frozen):
    alpha: float = Field(0.05, gt=0, lt=1)
    non_inferiority_margin: float = Field(0.05, ge=0, le=1)
    margins: dict[str, float] = Field(default_factory=dict, description="per-suite override")
    min_items: int = Field(20, ge=1)

    def margin_for(self, suite: str) -> float:
        return self.margins.get(suite, self.non_inferiority_margin)


class GatePolicy(Frozen):
    name: str = "default"
    offline: OfflineGate = OfflineGate()
    live: tuple[LiveGate, ...] = ()
    min_samples: int = Field(30, ge=1, description="per role per window; fewer never passes")
    alpha: float = Field(0.05, gt=0, lt=1)


# --------------------------------------------------------------------------- release spec


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
        TrafficConfig(), description="synthetic load for the embedded stack; None in production"
    )
    allow_incompatible: bool = False
    lock_wait_s: Seconds = Field(0.0, description="wait this long for another release, then refuse")

    @model_validator(mode="after")
    def _candidate_belongs_to_service(self) -> ReleaseSpec:
        if self.candidate.manifest.service != self.service:
            raise ValueError(
                f"candidate {self.candidate.manifest.model_id!r} belongs to service "
                f"{self.candidate.manifest.service!r}, not {self.service!r}"
            )
        return self


# --------------------------------------------------------------------------- verdicts


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


class ApprovalDecision(Strict):
    """What a human answers at a soft gate (the Prefect UI form)."""

    approve: bool = False
    reason: str = ""
    approver: str = ""


class StageOutcome(Frozen):
    stage: str
    outcome: Literal[
        "passed",
        "failed",
        "review",
        "approved",
        "rejected",
        "skipped",
        "done",
        "promoted",
        "rolled_back",
    ]
    detail: str = ""
    metrics: dict[str, float] = Field(default_factory=dict)
    at: datetime = Field(default_factory=lambda: datetime.now(UTC))


class ReleaseRecord(Strict):
    release_id: str
    service: str
    candidate: str
    candidate_version: str | None = None
    baseline_version: str | None = None
    decision: Literal["promoted", "rolled_back", "rejected", "running"] = "running"
    reason: str = ""
    stages: list[StageOutcome] = Field(default_factory=list)
    ledger_run_id: str | None = None
    breach_to_stable_ms: float | None = None


# --------------------------------------------------------------------------- data plane


class Role(StrEnum):
    STABLE = "stable"
    CANARY = "canary"
    SHADOW = "shadow"


class Routes(Frozen):
    """What the traffic controller is told: one service's split and mirror."""

    service: str
    stable: str = Field(description="registry version serving the stable share")
    canary: str | None = None
    weight: Percent = 0.0
    shadow: str | None = None
    mirror_percent: Percent = 0.0
    sticky_header: str | None = Field(None, description="e.g. x-canaryflow-user")

    @model_validator(mode="after")
    def _consistent(self) -> Routes:
        if self.weight > 0 and self.canary is None:
            raise ValueError("a canary weight needs a canary version")
        if self.mirror_percent > 0 and self.shadow is None:
            raise ValueError("a mirror share needs a shadow version")
        return self


class RequestRecord(Frozen):
    """One request as the model service saw it; text is already PII-masked."""

    request_id: str
    at: datetime
    service: str
    version: str
    role: Role
    user: str | None = None
    status: int
    latency_ms: float
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    prompt: str = ""
    response: str = ""
    checked: bool = False  # quality checkers ran on this one (sampled)
    hallucination: bool | None = None
    unsafe: bool | None = None
    injection_leak: bool | None = None
    refusal: bool | None = None


class Endpoints(Strict):
    """Where a release finds the running parts; written by the stack, passed to every task."""

    home: str
    mlflow_uri: str
    prefect_api_url: str | None = None
    provider_urls: dict[str, str] = Field(default_factory=dict)
    keys_dir: str
    store_url: str | None = None
    envoy_url: str | None = None
    envoy_admin_url: str | None = None
    envoy_home: str | None = None
    model_service_urls: list[str] = Field(
        default_factory=list, description="every model-service instance, for warm-up"
    )
    prometheus_url: str | None = None
    webhook_url: str | None = Field(
        default=None, description="the CI webhook receiver; deliveries go to POST /hooks/release"
    )
