"""The data plane: route splits, per-request records, where the running parts answer."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from pydantic import Field, model_validator

from canaryflow.contracts.base import Frozen, Percent, Strict


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
    # Live checkers (`quality.pipeline`): `checked` when at least one was sampled and none of
    # those failed; each flag combined across checkers (any True, else any False, else None:
    # not sampled, or not applicable, such as an answer with no checkable claim).
    checked: bool = False
    hallucination: bool | None = None
    unsafe: bool | None = None
    injection_leak: bool | None = None
    refusal: bool | None = None
    unchecked: bool = False  # a sampled checker failed: error, timeout, garbage, no result
    # Each sampled checker with its model and rubric version and its outcome, e.g.
    # "llm_judge/sandbox-judge/v1=judged;moderation/sandbox=failed(timed out after 3 s)".
    checks: str = ""
    # Sent through Envoy's synthetic listener (load a release asked for): never a user, so no
    # gate counts it. Envoy's public listener strips the header from clients.
    synthetic: bool = False
    # Streamed answers: when the first token reached the service, and the mean gap between
    # later token events. A non-streamed answer's first token arrives with the whole answer:
    # its ttft_ms is its latency_ms, so the TTFT gate sees every request.
    streamed: bool = False
    ttft_ms: float | None = None
    inter_token_ms: float | None = None
    # A probe (synthetic only): `<suite>/<item id>` of the labelled item it asked, and whether
    # the answer passed that item's scorer (None: not scored: unknown item, no answer, or a
    # scorer that needs a model).
    probe: str | None = None
    probe_passed: bool | None = None


class Endpoints(Strict):
    """Where a release finds the running parts; written by the stack, passed to every task."""

    home: str
    mlflow_uri: str
    prefect_api_url: str | None = None
    provider_urls: dict[str, str] = Field(default_factory=dict)
    keys_dir: str
    store_url: str | None = None
    envoy_url: str | None = None
    envoy_synthetic_url: str | None = Field(
        default=None, description="Envoy's loopback listener that marks requests as synthetic"
    )
    envoy_admin_url: str | None = None
    envoy_home: str | None = None
    model_service_urls: list[str] = Field(
        default_factory=list, description="every model-service instance's public (OpenAI) URL"
    )
    model_service_admin_urls: list[str] = Field(
        default_factory=list,
        description="every model-service instance's admin URL (loopback): warm-up, metrics",
    )
    prometheus_url: str | None = None
    request_timeout_s: float = Field(
        30.0,
        gt=0,
        description="the model services' provider timeout (`canaryflow serve --timeout`): a "
        "request unfinished by then is recorded as an error; the late look waits this long",
    )
    webhook_url: str | None = Field(
        default=None, description="the CI webhook receiver; deliveries go to POST /hooks/release"
    )


@dataclass(frozen=True)
class RouteChange:
    """What a rollback moved: the routes live before it (None: none set yet) and after it."""

    before: Routes | None
    after: Routes
