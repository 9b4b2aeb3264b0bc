"""Manifests, specs and users the demo, the tests and the benchmarks share (the Gemini adapter).

Production has users; the embedded stack has `simulated_users`: a population sending the `live`
corpus to Envoy's public listener, started and stopped by whoever owns the stack (the demo, a
test fixture), never by a release. Their requests are users' requests, and the gates judge them;
a spec's own `traffic` goes through the synthetic listener and is never judged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime

from canaryflow.contracts import (
    ApprovalConfig,
    CanaryPlan,
    CanaryStep,
    DecodingParameters,
    GatePolicy,
    ModelManifest,
    Origin,
    Price,
    ReleaseSpec,
    ShadowConfig,
    SignedManifest,
)
from canaryflow.contracts.dataplane import Endpoints
from canaryflow.errors import StackError
from canaryflow.local.loadgen import TrafficRunner, load_corpus

SERVICE = "my-assistant"
TEMPLATE = "You are a helpful docs assistant. Answer briefly.\n\nQuestion: {input}"
USER_CORPUS = "live"
USER_RATE_RPS = 250.0  # a 4 s window at a 5 % canary step: ~50 candidate requests
USER_STREAM_SHARE = 0.9  # chat products mostly stream; a tenth ask for whole answers
# The demo's offline stage asks a stratified 200 of each suite's 1,400 items (~2.5 s against the
# sandbox instead of ~13 s): enough for its candidates' verdicts, and each suite report states
# the smaller power that buys (a drop of ~8 pts, not ~4.4). Releases of your own take them all.
DEMO_SAMPLE_PER_SUITE = 200


def manifest(
    version: str,
    provider_model: str,
    *,
    dataset: str = "ds-20260112",
    tokenizer: str = "gemma-tok-3",
    embedding: str = "text-embedding-004",
    template: str = TEMPLATE,
    seed: int | None = 7,
    adapter_uri: str | None = None,
) -> ModelManifest:
    """The sandbox serves these models by name alone, so they name no artifact unless given
    one (publishing reads and checks an artifact that is named)."""
    return ModelManifest(
        model_id=f"{SERVICE}/gemini-docs-v{version}+{dataset}",
        created_at=datetime(2026, 1, 12, tzinfo=UTC),
        origin=Origin(provider="sandbox", model=provider_model),
        adapter_uri=adapter_uri,
        prompt_template=template,
        parameters=DecodingParameters(temperature=0.2, max_tokens=256, seed=seed),
        tokenizer_version=tokenizer,
        embedding_version=embedding,
        fine_tune_seed=1234,
        license="gemini-api-terms",
        allowed_uses=("commercial",),
        data_residency=("eu",),
        price=Price(input_per_1k=0.000125, output_per_1k=0.000375),
    )


def demo_spec(
    candidate: SignedManifest,
    policy: GatePolicy,
    *,
    window_s: float = 4.0,
    shadow: bool = True,
) -> ReleaseSpec:
    """Minutes of a real release squeezed into seconds: the durations are data."""
    return ReleaseSpec(
        service=SERVICE,
        candidate=candidate,
        shadow=ShadowConfig(
            enabled=shadow, mirror_percent=100, duration_s=2 * window_s, window_s=window_s
        ),
        canary=CanaryPlan(
            steps=[
                CanaryStep(weight=5, windows=2, window_s=window_s),
                CanaryStep(weight=10, windows=1, window_s=window_s),
                CanaryStep(weight=25, windows=1, window_s=window_s),
            ],
            max_extensions=2,
        ),
        policy=policy,
        sample_per_suite=DEMO_SAMPLE_PER_SUITE,
        approval=ApprovalConfig(timeout_s=120, default_action="reject", poll_s=1),
        adapt_windows=True,  # a 3 s window at 5% of 250 req/s is short of the gates' floor
    )


@contextlib.contextmanager
def simulated_users(
    endpoints: Endpoints,
    rate_rps: float = USER_RATE_RPS,
    *,
    users: int = 50,
    stream_share: float = USER_STREAM_SHARE,
) -> Iterator[TrafficRunner]:
    """Users of the embedded stack for as long as the block runs: `users` distinct user ids
    sending the example corpus to Envoy's public listener at `rate_rps` (open loop), the
    `stream_share` of them asking for streamed answers, as chat products do. Call the
    runner's `stop()` inside the block for its report; leaving the block stops it anyway."""
    if endpoints.envoy_url is None:
        raise StackError("simulated users need Envoy: start the stack's data plane first")
    with TrafficRunner(
        endpoints.envoy_url,
        load_corpus(USER_CORPUS),
        rate_rps,
        users=users,
        stream_share=stream_share,
    ) as runner:
        yield runner
