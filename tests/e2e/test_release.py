"""Whole releases through the real DAG: Prefect server, MLflow, sandbox, Envoy, model services."""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from canaryflow import connections
from canaryflow.app.approvals import paused_runs, resume_with_approval
from canaryflow.contracts import (
    ApprovalConfig,
    CanaryPlan,
    CanaryStep,
    GatePolicy,
    ModelManifest,
    ReleaseRecord,
    ReleaseSpec,
    ShadowConfig,
    SignedManifest,
    TrafficConfig,
)
from canaryflow.errors import ReleaseBusy
from canaryflow.loading import load_policy
from canaryflow.local import examples
from flows.release import release
from flows.rollback import rollback
from tests.e2e.conftest import LiveStack

POLICY = load_policy(Path(__file__).resolve().parents[2] / "deployments/policies/default.yaml")
# The approval tests need a window whose only finding is the soft cost gate.
COST_ONLY = POLICY.model_copy(
    update={
        "live": tuple(g for g in POLICY.live if g.metric.value in {"cost_per_1k", "error_rate"})
    }
)


def spec_for(
    live: LiveStack,
    signed: SignedManifest,
    *,
    shadow: bool = False,
    weights: tuple[float, ...] = (25.0,),
    approval: ApprovalConfig | None = None,
    policy: GatePolicy = POLICY,
    lock_wait_s: float = 15.0,
) -> ReleaseSpec:
    return ReleaseSpec(
        service=examples.SERVICE,
        candidate=signed,
        shadow=ShadowConfig(enabled=shadow, mirror_percent=100, duration_s=2.5, window_s=2.5),
        canary=CanaryPlan(steps=[CanaryStep(weight=w, windows=1, window_s=2.5) for w in weights]),
        policy=policy,
        approval=approval or ApprovalConfig(timeout_s=60, poll_s=1),
        traffic=TrafficConfig(rate_rps=200),
        lock_wait_s=lock_wait_s,
    )


def champion(live: LiveStack) -> str:
    return (
        connections.registry(live.endpoints.mlflow_uri)
        .resolve(examples.SERVICE, "champion")
        .version
    )


def stage(record: ReleaseRecord, name: str) -> Any:
    return next(s for s in record.stages if s.key == name)


def roles_through_envoy(live: LiveStack, n: int = 60) -> dict[str, int]:
    seen: dict[str, int] = {}
    with httpx.Client(base_url=str(live.endpoints.envoy_url), timeout=10) as client:
        for i in range(n):
            response = client.post(
                "/v1/chat/completions",
                json={"model": "x", "messages": [{"role": "user", "content": f"hello {i}"}]},
            )
            role = response.headers.get("x-canaryflow-role", "?")
            seen[role] = seen.get(role, 0) + 1
    return seen


def test_good_candidate_is_promoted_through_shadow_and_canary(live: LiveStack) -> None:
    before = champion(live)
    signed = live.sign(examples.manifest("1.2", "sandbox-good"))
    record = release(
        spec=spec_for(live, signed, shadow=True, weights=(10.0, 25.0)), endpoints=live.endpoints
    )

    assert record.decision == "promoted", record.reason
    names = [s.key for s in record.stages]
    for expected in (
        "preflight",
        "publish",
        "offline_eval",
        "shadow",
        "canary_10pct",
        "canary_25pct",
        "promote",
    ):
        assert expected in names
    registry = connections.registry(live.endpoints.mlflow_uri)
    aliases = registry.aliases(examples.SERVICE)
    assert aliases["champion"] == record.candidate_version
    assert aliases["last-stable"] == before
    assert "challenger" not in aliases
    published = registry.get(examples.SERVICE, str(record.candidate_version))
    assert published.status == "promoted"
    assert (
        published.tags["canaryflow.eval_uri"] == f"runs:/{record.ledger_run_id}/offline_eval.json"
    )
    routes = connections.traffic_controller(live.endpoints, examples.SERVICE).current()
    assert routes is not None and routes.stable == record.candidate_version and routes.weight == 0
    assert roles_through_envoy(live, 20) == {"stable": 20}
    ledger = connections.ledger(live.endpoints.mlflow_uri)
    assert ledger.record(str(record.ledger_run_id)).decision == "promoted"
    artifacts = httpx.post(
        f"{live.endpoints.prefect_api_url}/artifacts/filter",
        json={"artifacts": {"key": {"like_": "canary-my-assistant"}}},
    ).json()
    assert artifacts, "the canary windows publish their gate evidence as Prefect artifacts"
    # Stages before promotion: the last events of a release may still be in flight.
    expected = {
        "canaryflow.window.pass",
        "canaryflow.shadow.passed",
        "canaryflow.canary_10pct.passed",
    }
    names: set[str] = set()
    for _ in range(40):  # events are sent and stored asynchronously
        events = httpx.post(
            f"{live.endpoints.prefect_api_url}/events/filter",
            json={
                "filter": {
                    "event": {"prefix": ["canaryflow."]},
                    "resource": {"id": [f"canaryflow.release.{record.release_id}"]},
                },
                "limit": 50,
            },
        ).json()["events"]
        names = {e["event"] for e in events}
        if expected <= names:
            break
        time.sleep(0.5)
    assert expected <= names


def test_hallucinating_candidate_is_rejected_at_the_offline_gate(live: LiveStack) -> None:
    before = champion(live)
    routes_before = connections.traffic_controller(live.endpoints, examples.SERVICE).current()
    signed = live.sign(examples.manifest("1.3", "sandbox-hallucinating"))
    record = release(spec=spec_for(live, signed), endpoints=live.endpoints)

    assert record.decision == "rejected"
    offline = stage(record, "offline_eval")
    assert offline.outcome == "failed"
    assert "golden" in offline.detail
    assert champion(live) == before
    assert (
        connections.traffic_controller(live.endpoints, examples.SERVICE).current() == routes_before
    )
    published = connections.registry(live.endpoints.mlflow_uri).get(
        examples.SERVICE, str(record.candidate_version)
    )
    assert published.status == "rolled_back"


def test_slow_candidate_is_caught_in_a_canary_window_and_rolled_back(live: LiveStack) -> None:
    before = champion(live)
    signed = live.sign(examples.manifest("1.4", "sandbox-slow"))
    record = release(spec=spec_for(live, signed), endpoints=live.endpoints)

    assert record.decision == "rolled_back", record.reason
    assert "latency_p95" in record.reason
    assert stage(record, "offline_eval").outcome == "passed"
    assert record.breach_to_stable_ms is not None and record.breach_to_stable_ms < 5000
    routes = connections.traffic_controller(live.endpoints, examples.SERVICE).current()
    assert routes is not None and routes.canary is None and routes.stable == before
    assert roles_through_envoy(live, 40) == {"stable": 40}
    assert champion(live) == before


def test_tampered_manifest_is_refused_before_anything_happens(live: LiveStack) -> None:
    registry = connections.registry(live.endpoints.mlflow_uri)
    signed = live.sign(examples.manifest("1.5", "sandbox-good"))
    tampered_manifest = ModelManifest.model_validate(
        {
            **signed.manifest.model_dump(),
            "origin": {"provider": "sandbox", "model": "sandbox-unsafe"},
        }
    )
    tampered = SignedManifest(manifest=tampered_manifest, signature=signed.signature)
    versions_before = registry.aliases(examples.SERVICE)

    record = release(spec=spec_for(live, tampered), endpoints=live.endpoints)

    assert record.decision == "rejected"
    assert record.candidate_version is None, "nothing may be published"
    assert "changed after it was signed" in stage(record, "preflight").detail
    assert registry.aliases(examples.SERVICE) == versions_before


def test_manifest_signed_by_an_unknown_key_is_refused(live: LiveStack, tmp_path: Path) -> None:
    from canaryflow.registry.signing import generate_keypair, sign

    stranger = generate_keypair(tmp_path, "stranger")
    signed = sign(examples.manifest("1.6", "sandbox-good"), stranger.private_path)
    record = release(spec=spec_for(live, signed), endpoints=live.endpoints)
    assert record.decision == "rejected"
    assert "not among" in stage(record, "preflight").detail


def _in_background(fn: Callable[[], ReleaseRecord]) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["record"] = fn()
        except BaseException as exc:
            box["error"] = exc

    # Prefect's settings live in a context variable: the thread must carry the test's context.
    context = contextvars.copy_context()
    thread = threading.Thread(target=context.run, args=(run,), daemon=True)
    thread.start()
    return thread, box


def _wait_for_pause(live: LiveStack, thread: threading.Thread, timeout_s: float = 90) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and thread.is_alive():
        runs = paused_runs(str(live.endpoints.prefect_api_url))
        if runs:
            return str(runs[0]["id"])
        time.sleep(0.5)
    raise AssertionError("the release never paused for approval")


def test_soft_gate_pauses_and_the_ui_call_resumes_it(live: LiveStack) -> None:
    signed = live.sign(examples.manifest("1.7", "sandbox-verbose"))
    spec = spec_for(live, signed, policy=COST_ONLY)
    thread, box = _in_background(lambda: release(spec=spec, endpoints=live.endpoints))
    run_id = _wait_for_pause(live, thread)
    status = resume_with_approval(
        str(live.endpoints.prefect_api_url),
        run_id,
        approve=True,
        reason="cost accepted",
        approver="sre-on-call",
    )
    assert status == "ACCEPT"
    thread.join(120)
    assert "error" not in box, box.get("error")
    record: ReleaseRecord = box["record"]
    approval = next(s for s in record.stages if s.key.endswith("_approval"))
    assert approval.outcome == "approved"
    assert "sre-on-call" in approval.detail and "cost accepted" in approval.detail
    assert record.decision == "promoted"
    rollback(service=examples.SERVICE, reason="undo the verbose adapter", endpoints=live.endpoints)


def test_unanswered_review_applies_the_policy_default(live: LiveStack) -> None:
    before = champion(live)
    signed = live.sign(examples.manifest("1.8", "sandbox-verbose"))
    approval = ApprovalConfig(timeout_s=2, default_action="reject", poll_s=1)
    spec = spec_for(live, signed, policy=COST_ONLY, approval=approval)
    record = release(spec=spec, endpoints=live.endpoints)
    approval = next(s for s in record.stages if s.key.endswith("_approval"))
    assert approval.outcome == "rejected"
    assert approval.metrics["timed_out"] == 1.0
    assert "policy default" in approval.detail
    assert record.decision == "rolled_back"
    assert champion(live) == before


def test_one_release_per_service_at_a_time(live: LiveStack) -> None:
    first = live.sign(examples.manifest("1.9", "sandbox-verbose"))
    spec = spec_for(live, first, policy=COST_ONLY)
    thread, box = _in_background(lambda: release(spec=spec, endpoints=live.endpoints))
    run_id = _wait_for_pause(live, thread)
    second = live.sign(examples.manifest("2.0", "sandbox-good"))
    with pytest.raises(ReleaseBusy, match="another release of 'my-assistant' is running"):
        release(spec=spec_for(live, second, lock_wait_s=0.5), endpoints=live.endpoints)
    resume_with_approval(
        str(live.endpoints.prefect_api_url),
        run_id,
        approve=False,
        reason="test over",
        approver="test",
    )
    thread.join(120)
    assert box["record"].decision == "rolled_back"


def test_rollback_flow_restores_last_stable(live: LiveStack) -> None:
    registry = connections.registry(live.endpoints.mlflow_uri)
    signed = live.sign(examples.manifest("2.1", "sandbox-good"))
    spec = spec_for(live, signed).model_copy(update={"suites": ["golden"]})
    promoted = release(spec=spec, endpoints=live.endpoints)
    assert promoted.decision == "promoted", promoted.reason
    previous = registry.resolve(examples.SERVICE, "last-stable").version

    summary = rollback(service=examples.SERVICE, reason="pager says so", endpoints=live.endpoints)

    assert summary["champion"] == previous
    assert registry.resolve(examples.SERVICE, "champion").version == previous
    routes = connections.traffic_controller(live.endpoints, examples.SERVICE).current()
    assert routes is not None and routes.stable == previous


def test_live_metrics_are_queryable_with_promql(live: LiveStack) -> None:
    from datetime import UTC, datetime, timedelta

    from canaryflow.analysis.sources import PrometheusSource

    source = PrometheusSource(str(live.endpoints.prometheus_url))
    assert source.series_present(examples.SERVICE)
    end = datetime.now(UTC)
    seen = source.summaries(examples.SERVICE, end - timedelta(minutes=10), end)
    roles = {role for _, role in seen}
    assert {"stable", "canary", "shadow"} <= roles, seen.keys()
    stable = max((s for (_, role), s in seen.items() if role == "stable"), key=lambda s: s.requests)
    assert stable.requests > 100 and 10 < stable.p95_ms < 2000
    assert 0 < stable.cost_per_1k < 1


def test_nightly_evaluation_compares_champion_with_last_stable(live: LiveStack) -> None:
    from flows.nightly_eval import nightly_eval

    report = nightly_eval(service=examples.SERVICE, endpoints=live.endpoints)
    assert {s.suite for s in report.suites} == {"golden", "regression", "safety"}
    assert sum(s.n for s in report.suites) >= 200
    assert report.decision.value in {"pass", "review"}
