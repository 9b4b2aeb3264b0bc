"""Whole releases through the real DAG: Prefect server, MLflow, sandbox, Envoy, model services."""

from __future__ import annotations

import contextvars
import math
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from canaryflow import connections, runbook
from canaryflow.analysis.planning import adapted
from canaryflow.analysis.sources import PrometheusSource
from canaryflow.app.approvals import paused_runs, resume_with_approval
from canaryflow.contracts import (
    ApprovalConfig,
    CanaryPlan,
    CanaryStep,
    GatePolicy,
    ModelManifest,
    PolicyFloor,
    ReleaseRecord,
    ReleaseSpec,
    Routes,
    ShadowConfig,
    SignedManifest,
)
from canaryflow.errors import ReleaseBusy
from canaryflow.loading import load_policy
from canaryflow.local import examples
from canaryflow.local.loadgen import TrafficRunner, load_corpus
from flows.release import release
from flows.rollback import rollback
from tests.e2e.conftest import LiveStack
from tests.waiting import wait_for

POLICY = load_policy(Path(__file__).resolve().parents[2] / "deployments/policies/default.yaml")
# The approval tests need a window whose only finding is the soft cost gate: the hard gates of
# the worker's floor, which every release must carry (the verbose adapter is as fast and as
# accurate as its baseline), and the soft cost gate.
COST_ONLY = POLICY.model_copy(
    update={
        "live": (
            *PolicyFloor().required_gates,
            *(g for g in POLICY.live if g.metric.value == "cost_per_1k"),
        )
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
    adapt_windows: bool = True,
) -> ReleaseSpec:
    """2.5 s windows; where the users' measured traffic cannot fill one (preflight's plan),
    it is lengthened unless `adapt_windows` is False."""
    return ReleaseSpec(
        service=examples.SERVICE,
        candidate=signed,
        shadow=ShadowConfig(enabled=shadow, mirror_percent=100, duration_s=2.5, window_s=2.5),
        canary=CanaryPlan(steps=[CanaryStep(weight=w, windows=1, window_s=2.5) for w in weights]),
        policy=policy,
        approval=approval or ApprovalConfig(timeout_s=60, poll_s=1),
        lock_wait_s=lock_wait_s,
        adapt_windows=adapt_windows,
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


@pytest.mark.usefixtures("users")  # the gates judge their requests
def test_good_candidate_is_promoted_through_shadow_and_canary(live: LiveStack) -> None:
    before = champion(live)
    signed = live.sign(examples.manifest("1.2", "sandbox-good"))
    record = release(spec=spec_for(live, signed, shadow=True, weights=(10.0, 25.0)))

    assert record.decision == "promoted", record.reason
    stages = [s.key for s in record.stages]
    for key in (
        "preflight",
        "publish",
        "offline_eval",
        "shadow",
        "canary_10pct",
        "canary_25pct",
        "promote",
    ):
        assert key in stages
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

    def stored() -> set[str] | None:  # events are sent and stored asynchronously
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
        return names if expected <= names else None

    wait_for(f"the release's events {sorted(expected)} in Prefect", stored, 20, 0.5)


def test_hallucinating_candidate_is_rejected_at_the_offline_gate(live: LiveStack) -> None:
    before = champion(live)
    routes_before = connections.traffic_controller(live.endpoints, examples.SERVICE).current()
    signed = live.sign(examples.manifest("1.3", "sandbox-hallucinating"))
    record = release(spec=spec_for(live, signed))

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


@pytest.mark.usefixtures("users")  # the gates judge their requests
def test_slow_candidate_is_caught_in_a_canary_window_and_rolled_back(live: LiveStack) -> None:
    before = champion(live)
    signed = live.sign(examples.manifest("1.4", "sandbox-slow"))
    record = release(spec=spec_for(live, signed))

    assert record.decision == "rolled_back", record.reason
    assert "latency_p95" in record.reason
    assert stage(record, "offline_eval").outcome == "passed"
    # Recorded and consistent; how fast it is belongs to benchmarks/, not to a threshold here.
    breach_ms = record.breach_to_stable_ms
    assert breach_ms is not None and math.isfinite(breach_ms) and breach_ms > 0
    figures = stage(record, "rollback").metrics
    assert figures["breach_to_stable_ms"] == breach_ms
    # The breach came first, then the one rollback call: it is part of breach-to-stable.
    assert 0 < figures["rollback_ms"] <= breach_ms
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

    record = release(spec=spec_for(live, tampered))

    assert record.decision == "rejected"
    assert record.candidate_version is None, "nothing may be published"
    assert "changed after it was signed" in stage(record, "preflight").detail
    assert registry.aliases(examples.SERVICE) == versions_before


@pytest.mark.usefixtures("users")  # 200 req/s: a 1% step gets ~5 requests in a 2.5 s window
def test_a_plan_that_cannot_decide_at_the_traffic_is_refused_with_its_numbers(
    live: LiveStack,
) -> None:
    registry = connections.registry(live.endpoints.mlflow_uri)
    aliases = registry.aliases(examples.SERVICE)
    signed = live.sign(examples.manifest("1.7", "sandbox-good"))

    record = release(spec=spec_for(live, signed, weights=(1.0, 25.0), adapt_windows=False))

    assert record.decision == "rejected"
    assert record.candidate_version is None, "nothing may be published"
    detail = stage(record, "preflight").detail
    assert "cannot decide at its traffic" in detail and "canary 1%" in detail, detail
    assert "make the window at least" in detail and "canary 25%" not in detail, detail
    assert registry.aliases(examples.SERVICE) == aliases

    adapting = spec_for(live, signed, weights=(1.0,))
    planned = runbook.plan_at_traffic(adapting, live.endpoints)
    assert planned is not None and planned.problems
    longer = adapted(adapting, planned)
    assert longer.canary.steps[0].window_s >= 10.0  # 30 requests at ~2 req/s


def test_manifest_signed_by_an_unknown_key_is_refused(live: LiveStack, tmp_path: Path) -> None:
    from canaryflow.registry.signing import generate_keypair, sign

    stranger = generate_keypair(tmp_path, "stranger", [examples.SERVICE])
    signed = sign(examples.manifest("1.6", "sandbox-good"), stranger.private_path)
    record = release(spec=spec_for(live, signed))
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
    """The id of the flow run paused for approval, once there is one; fails at once if the
    release in `thread` ends without pausing."""

    def paused() -> str | None:
        runs = paused_runs(str(live.endpoints.prefect_api_url))
        if runs:
            return str(runs[0]["id"])
        if not thread.is_alive():  # looked after the query: it ended without ever pausing
            pytest.fail("the release ended without pausing for approval")
        return None

    run_id = wait_for("the release to pause for approval", paused, timeout_s, 0.5)
    assert run_id is not None  # wait_for returns only a truthy answer
    return run_id


@pytest.mark.usefixtures("users")  # the gates judge their requests
def test_soft_gate_pauses_and_the_ui_call_resumes_it(live: LiveStack) -> None:
    signed = live.sign(examples.manifest("1.7", "sandbox-verbose"))
    spec = spec_for(live, signed, policy=COST_ONLY)
    thread, box = _in_background(lambda: release(spec=spec))
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
    assert not thread.is_alive(), "the approved release did not finish"
    assert "error" not in box, box.get("error")
    record: ReleaseRecord = box["record"]
    approval = next(s for s in record.stages if s.key.endswith("_approval"))
    assert approval.outcome == "approved"
    assert "sre-on-call" in approval.detail and "cost accepted" in approval.detail
    assert record.decision == "promoted"
    rollback(service=examples.SERVICE, reason="undo the verbose adapter")


@pytest.mark.usefixtures("users")  # the gates judge their requests
def test_unanswered_review_applies_the_policy_default(live: LiveStack) -> None:
    before = champion(live)
    signed = live.sign(examples.manifest("1.8", "sandbox-verbose"))
    unanswered = ApprovalConfig(timeout_s=2, default_action="reject", poll_s=1)
    spec = spec_for(live, signed, policy=COST_ONLY, approval=unanswered)
    record = release(spec=spec)
    approval = next(s for s in record.stages if s.key.endswith("_approval"))
    assert approval.outcome == "rejected"
    assert approval.metrics["timed_out"] == 1.0
    assert "policy default" in approval.detail
    assert record.decision == "rolled_back"
    assert champion(live) == before


@pytest.mark.usefixtures("users")  # the gates judge their requests
def test_one_release_per_service_at_a_time(live: LiveStack) -> None:
    first = live.sign(examples.manifest("1.9", "sandbox-verbose"))
    spec = spec_for(live, first, policy=COST_ONLY)
    thread, box = _in_background(lambda: release(spec=spec))
    run_id = _wait_for_pause(live, thread)
    second = live.sign(examples.manifest("2.0", "sandbox-good"))
    with pytest.raises(ReleaseBusy, match="another release of 'my-assistant' is running"):
        release(spec=spec_for(live, second, lock_wait_s=0.5))
    resume_with_approval(
        str(live.endpoints.prefect_api_url),
        run_id,
        approve=False,
        reason="test over",
        approver="test",
    )
    thread.join(120)
    assert not thread.is_alive(), "the rejected release did not finish"
    assert "error" not in box, box.get("error")
    assert box["record"].decision == "rolled_back"


@pytest.mark.usefixtures("users")  # the gates judge their requests
def test_rollback_flow_restores_last_stable(live: LiveStack) -> None:
    registry = connections.registry(live.endpoints.mlflow_uri)
    signed = live.sign(examples.manifest("2.1", "sandbox-good"))
    spec = spec_for(live, signed).model_copy(update={"suites": ["golden"]})
    promoted = release(spec=spec)
    assert promoted.decision == "promoted", promoted.reason
    previous = registry.resolve(examples.SERVICE, "last-stable").version

    summary = rollback(service=examples.SERVICE, reason="pager says so")

    assert summary["champion"] == previous
    assert registry.resolve(examples.SERVICE, "champion").version == previous
    routes = connections.traffic_controller(live.endpoints, examples.SERVICE).current()
    assert routes is not None and routes.stable == previous


def role_totals(source: PrometheusSource) -> dict[str, float]:
    """Requests each role of the service has served so far: raw counters, exact (no
    extrapolation as in increase()), so the rise over a test is what that test sent."""
    promql = f'sum by (role) (canaryflow_requests_total{{service="{examples.SERVICE}"}})'
    return {row["metric"].get("role", ""): float(row["value"][1]) for row in source.query(promql)}


def test_live_metrics_are_queryable_with_promql(live: LiveStack) -> None:
    """Its own traffic, whatever ran before: a canary split and a full mirror for a burst of
    synthetic requests, then PromQL over the series since the test began."""
    source = PrometheusSource(str(live.endpoints.prometheus_url))
    controller = connections.traffic_controller(live.endpoints, examples.SERVICE)
    previous = controller.current()
    assert previous is not None, "the stack starts with stable routes"
    version = previous.stable  # serving already; the series differ by role, which is queried
    roles = ("stable", "canary", "shadow")
    began = datetime.now(UTC)
    before = role_totals(source)

    seen_last: dict[str, Any] = {}

    def since_began() -> dict[str, Any]:
        seen = source.summaries(examples.SERVICE, began, datetime.now(UTC))
        found = {role: seen.get((version, role)) for role in roles}
        seen_last.update(every=sorted(seen), routes=controller.current())  # for the failure
        return found if all(found.values()) else {}

    split = Routes(service=examples.SERVICE, stable=version, canary=version, weight=50,
                   shadow=version, mirror_percent=100)  # fmt: skip
    try:
        controller.set_routes(split)
        url = str(live.endpoints.envoy_url)
        with TrafficRunner(url, load_corpus("live"), rate_rps=50) as runner:
            # Traffic flows until Prometheus has scraped each role's series over several samples.
            try:
                wait_for("stable, canary and shadow series since the test began", since_began,
                         60, 0.5)  # fmt: skip
            except BaseException:
                print(f"series seen (version, role): {seen_last}; client: {runner.stop()}")
                raise
            report = runner.stop()
    finally:
        controller.set_routes(previous)

    assert report.ok > 0
    # What the client saw: the split, and never a shadow's answer (mirror answers are dropped).
    assert set(report.roles) == {"stable", "canary"}, report.roles
    served = sum(report.roles.values())
    # Every answered request was counted under the role that answered it, and mirrored once.
    sent = {**report.roles, "shadow": served}

    def counted() -> dict[str, float]:
        totals = role_totals(source)
        rise = {role: totals.get(role, 0.0) - before.get(role, 0.0) for role in roles}
        return rise if all(rise[role] >= sent[role] for role in roles) else {}

    wait_for(f"Prometheus to count at least {sent} requests by role", counted, 30, 0.5)

    assert source.series_present(examples.SERVICE)
    summaries = since_began()
    assert summaries, "the series since the test began are still there"
    for role, summary in summaries.items():
        assert summary.requests > 0, role
        assert math.isfinite(summary.p95_ms) and summary.p95_ms > 0, (role, summary)
        assert summary.p50_ms <= summary.p95_ms <= summary.p99_ms, (role, summary)
    assert 0 < summaries["stable"].cost_per_1k < 1
