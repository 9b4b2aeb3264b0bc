"""The release runbook as a Prefect flow.

preflight -> publish -> offline eval -> shadow windows -> canary steps and windows -> promote,
with a pause for a human wherever a soft gate asks, and a rollback (traffic first) wherever a hard
gate fails. The flow records its own decision in the ledger: the final state of a flow run is not
the decision (a timed-out pause can leave a run Failed although the rollback ran).
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from typing import Any

from prefect import flow
from prefect.client.schemas.objects import FlowRun, State
from prefect.flows import Flow

from canaryflow import runbook
from canaryflow.contracts import (
    Decision,
    Endpoints,
    EvalReport,
    ReleaseRecord,
    ReleaseSpec,
    Routes,
    StageOutcome,
    WindowResult,
)
from canaryflow.errors import CanaryflowError
from canaryflow.forensics import capture
from canaryflow.registry.versions import PublishedVersion
from canaryflow.settings import Settings, load_endpoints
from tasks.analysis import judge_window
from tasks.approval import wait_for_approval
from tasks.common import emit, flush_events
from tasks.evaluation import evaluate_candidate
from tasks.ledger import close_ledger, log_evidence, open_ledger, record_stage
from tasks.lock import release_lock
from tasks.preflight import verify_candidate
from tasks.registry import mark_rolled_back, promote_candidate, publish_candidate, set_status
from tasks.traffic import roll_back_traffic, shift_traffic, synthetic_traffic, warm_up_candidate


class Stop(Exception):
    """A gate (or a human) said no: roll back if traffic moved, and record why."""

    def __init__(self, stage: str, reason: str, breach_at: datetime | None = None) -> None:
        super().__init__(reason)
        self.stage = stage
        self.reason = reason
        self.breach_at = breach_at


class Release:
    """The state one run carries from stage to stage, and the ledger entry for each."""

    def __init__(self, spec: ReleaseSpec, endpoints: Endpoints) -> None:
        self.spec = spec
        self.endpoints = endpoints
        self.record = ReleaseRecord(
            release_id=f"{spec.service}-{datetime.now(UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}",
            service=spec.service,
            candidate=spec.candidate.manifest.model_id,
        )
        self.candidate: PublishedVersion | None = None
        self.baseline: PublishedVersion | None = None
        self.windows: list[WindowResult] = []
        self.live_since: datetime | None = None
        self.sequential: dict[str, dict[str, object]] = {}
        self.waived: set[str] = set()  # soft gates a human approved for this release

    def stage(self, name: str, outcome: str, detail: str = "", **metrics: float) -> None:
        result = StageOutcome(stage=name, outcome=outcome, detail=detail, metrics=metrics)  # type: ignore[arg-type]
        record_stage(self.record, result, self.endpoints)
        self.record.stages.append(result)
        print(f"[{name}] {outcome}: {detail}")

    def ask_human(self, stage: str, question: str, key: str) -> None:
        """Soft gate: pause; a rejection (or a timeout defaulting to reject) stops the release."""
        # A paused release is alive: the silence automation stops counting until the answer.
        emit(f"{stage}_approval", "waiting", self.record.release_id, self.spec.service, key=key)
        decision, timed_out = wait_for_approval(question, self.spec.approval, key)
        verb = "approved" if decision.approve else "rejected"
        who = decision.approver or "unknown"
        detail = f"{who}: {decision.reason or 'no reason given'}"
        self.stage(f"{stage}_approval", verb, detail, timed_out=float(timed_out))
        if not decision.approve:
            raise Stop(stage, f"{stage} review {verb} by {detail}")

    def routes(self, **split: Any) -> Routes:
        assert self.baseline is not None
        return Routes(service=self.spec.service, stable=self.baseline.version, **split)


def _preflight_and_publish(release: Release) -> None:
    try:
        checked = verify_candidate(release.spec, release.endpoints)
    except CanaryflowError as exc:
        release.stage("preflight", "failed", str(exc))
        raise Stop("preflight", str(exc)) from exc
    release.baseline = checked.baseline
    release.record.baseline_version = checked.baseline.version
    release.stage("preflight", "passed", f"signed by {checked.key_id}; compatible")

    release.candidate = publish_candidate(release.spec, release.endpoints)
    release.record.candidate_version = release.candidate.version
    release.stage("publish", "done", f"version {release.candidate.version} is the challenger")


def _offline_gate(release: Release) -> EvalReport:
    assert release.candidate is not None and release.baseline is not None
    report = evaluate_candidate(
        release.spec, release.candidate, release.baseline, release.endpoints,
        release.record.ledger_run_id,
    )  # fmt: skip
    worst = min(report.suites, key=lambda s: s.diff) if report.suites else None
    summary = "; ".join(s.result.reason for s in report.suites if s.result.label.value != "pass")
    metrics = {f"{s.suite}_diff": s.diff for s in report.suites}
    if report.decision is Decision.FAIL:
        release.stage("offline_eval", "failed", summary, **metrics)
        raise Stop("offline_eval", f"offline gate failed: {summary}")
    if report.decision is not Decision.PASS:
        release.stage("offline_eval", "review", summary, **metrics)
        release.ask_human("offline_eval", f"offline evaluation needs review: {summary}", "offline")
    else:
        detail = f"non-inferior on {len(report.suites)} suites"
        if worst is not None:
            detail += f" (worst: {worst.suite} {worst.diff * 100:+.1f} pts)"
        release.stage("offline_eval", "passed", detail, **metrics)
    return report


def _judge_until_done(release: Release, stage: str, routes: Routes, step: int, windows: int,
                      window_s: float) -> None:  # fmt: skip
    """Repeated windows: PASS counts, FAIL stops, REVIEW asks, INCONCLUSIVE extends.

    The sequential tests' state runs over the whole stage: every look at the same candidate
    counts against the same error budget.
    """
    state = release.sequential.get(stage)
    passed = extensions = index = 0
    while passed < windows:
        window, state = judge_window(
            release.endpoints, release.spec.policy, stage, routes, step, index, window_s, state
        )
        release.windows.append(window)
        release.sequential[stage] = state
        emit("window", window.decision.value, release.record.release_id, release.spec.service,
             stage=stage, step=step, window=index, weight=window.weight)  # fmt: skip
        log_evidence(release.record, f"{stage}_s{step}_w{index}", window.model_dump(mode="json"),
                     release.endpoints)  # fmt: skip
        index += 1
        failing = "; ".join(
            f"{g.gate}: {g.reason}" for g in window.gates if g.label.value != "pass"
        )
        if window.decision is Decision.PASS:
            passed += 1
        elif window.decision is Decision.FAIL:
            raise Stop(stage, f"{stage} window {index} failed: {failing}", window.ended_at)
        elif window.decision is Decision.REVIEW:
            reviewing = {g.gate for g in window.gates if g.label.value != "pass"}
            if not reviewing <= release.waived:  # a human already accepted these gates once
                release.ask_human(stage, f"{stage} window {index} needs review: {failing}",
                                  f"{stage}-{step}-{index}")  # fmt: skip
                release.waived |= reviewing
            passed += 1
        else:
            extensions += 1
            if extensions > release.spec.canary.max_extensions:
                reason = (
                    f"{stage}: still inconclusive after {extensions} extra windows ({failing}); "
                    "no data is never a pass"
                )
                raise Stop(stage, reason, window.ended_at)


def _shadow(release: Release) -> None:
    shadow = release.spec.shadow
    assert release.candidate is not None
    if not shadow.enabled:
        release.stage("shadow", "skipped", "disabled in the spec")
        return
    routes = shift_traffic(
        release.routes(shadow=release.candidate.version, mirror_percent=shadow.mirror_percent),
        release.endpoints,
    )
    set_status(release.spec.service, release.candidate.version, "shadow", release.endpoints)
    windows = max(1, round(shadow.duration_s / max(shadow.window_s, 0.001)))
    _judge_until_done(release, "shadow", routes, 0, windows, shadow.window_s)
    release.stage("shadow", "passed", f"{windows} window(s) at {shadow.mirror_percent:g}% mirror")


def _canary(release: Release) -> None:
    assert release.candidate is not None
    set_status(release.spec.service, release.candidate.version, "canary", release.endpoints)
    for step, plan in enumerate(release.spec.canary.steps):
        routes = shift_traffic(
            release.routes(canary=release.candidate.version, weight=plan.weight),
            release.endpoints,
        )
        _judge_until_done(release, "canary", routes, step, plan.windows, plan.window_s)
        detail = f"{plan.windows} window(s) at {plan.weight:g}%"
        release.stage(f"canary_{plan.weight:g}pct", "passed", detail, weight=plan.weight)


def _promote(release: Release) -> None:
    assert release.candidate is not None
    shift_traffic(
        Routes(service=release.spec.service, stable=release.candidate.version), release.endpoints
    )
    previous = promote_candidate(release.spec.service, release.candidate.version, release.endpoints)
    release.record.decision = "promoted"
    release.record.reason = "every gate passed"
    release.stage("promote", "done", f"champion v{release.candidate.version}; "
                  f"last-stable v{previous}")  # fmt: skip


def _roll_back(release: Release, stop: Stop) -> None:
    """Traffic first, in one call; then the registry, then the forensics bundle."""
    release.record.reason = stop.reason
    if release.candidate is None:  # refused before anything was published
        release.record.decision = "rejected"
        return
    moved = release.live_since is not None
    if moved:
        result = roll_back_traffic(release.spec.service, release.endpoints)
        if stop.breach_at is not None:
            release.record.breach_to_stable_ms = (
                datetime.now(UTC) - stop.breach_at
            ).total_seconds() * 1000
        release.stage("rollback", "done", "all traffic on stable",
                      rollback_ms=result.rollback_ms,
                      breach_to_stable_ms=release.record.breach_to_stable_ms or 0.0)  # fmt: skip
        bundle = capture(
            release.endpoints,
            release.spec.service,
            since=release.live_since or datetime.now(UTC),
            until=datetime.now(UTC),
            candidate_version=release.candidate.version,
            routes_before=result.before,
            routes_after=result.after,
            windows=release.windows,
            reason=stop.reason,
        )
        log_evidence(release.record, "forensics", bundle, release.endpoints)
    mark_rolled_back(release.spec.service, release.candidate.version, stop.reason,
                     release.endpoints)  # fmt: skip
    release.record.decision = "rolled_back" if moved else "rejected"


def _roll_back_on_crash(flow: Flow[..., Any], flow_run: FlowRun, state: State[Any]) -> None:
    """A canary never outlives its owner: a crashed or cancelled release returns traffic."""
    spec = ReleaseSpec.model_validate(flow_run.parameters["spec"])
    raw = flow_run.parameters.get("endpoints")
    endpoints = Endpoints.model_validate(raw) if raw else load_endpoints(Settings().home)
    result = runbook.rollback_traffic(endpoints, spec.service)
    # Evidence for on-call, and the end of the release for the silence automation.
    emit("release", state.type.value.lower(), f"{spec.service}-{flow_run.name}", spec.service,
         flow_run_id=str(flow_run.id), state=state.name, stable=result.after.stable,
         rollback_ms=result.rollback_ms)  # fmt: skip
    flush_events()


@flow(name="release", log_prints=True, on_crashed=[_roll_back_on_crash],
      on_cancellation=[_roll_back_on_crash])  # fmt: skip
def release(spec: ReleaseSpec, endpoints: Endpoints | None = None) -> ReleaseRecord:
    """Release `spec.candidate` for `spec.service`, or refuse it and keep the evidence."""
    endpoints = endpoints or load_endpoints(Settings().home)
    run = Release(spec, endpoints)
    started = time.perf_counter()
    with release_lock(spec.service, spec.lock_wait_s):
        run.record.ledger_run_id = open_ledger(run.record, spec.model_dump(mode="json"), endpoints)
        try:
            _preflight_and_publish(run)
            _offline_gate(run)
            assert run.candidate is not None
            warm_up_candidate(run.candidate.version, endpoints)
            with synthetic_traffic(spec, endpoints):
                run.live_since = datetime.now(UTC)
                # Starts the silence clock of the rollback deployment's trigger (prefect.yaml).
                emit(
                    "live",
                    "started",
                    run.record.release_id,
                    spec.service,
                    stable=run.record.baseline_version,
                    candidate=run.candidate.version,
                )
                _shadow(run)
                _canary(run)
            _promote(run)
        except Stop as stop:
            _roll_back(run, stop)
        except BaseException as exc:
            _roll_back(run, Stop("crash", f"release crashed: {type(exc).__name__}: {exc}"))
            run.record.decision = "rolled_back"
            close_ledger(run.record, endpoints)
            raise
        run.stage("release", run.record.decision, run.record.reason,
                  seconds=time.perf_counter() - started)  # fmt: skip
        close_ledger(run.record, endpoints)
    flush_events()
    return run.record
