"""The release runbook as a Prefect flow.

preflight -> publish -> offline eval -> shadow windows -> canary steps and windows -> promote,
with a pause for a human wherever a soft gate asks, and a rollback (traffic first) wherever a hard
gate fails. What each window means for the stage is decided by `canaryflow.analysis.progress`;
this file only carries it out. The flow records its own decision in the ledger: the final state
of a flow run is not the decision (a timed-out pause can leave a run Failed after a rollback).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from prefect import flow

from canaryflow.analysis.progress import Limits
from canaryflow.contracts import (
    Decision,
    Endpoints,
    Outcome,
    PolicyFloor,
    ReleaseDecision,
    ReleaseRecord,
    ReleaseSpec,
    Routes,
    Stage,
)
from canaryflow.errors import ArtifactError, CanaryflowError, RoutesChanged
from canaryflow.settings import Settings, worker_endpoints
from flows.promotion import await_promotion_window
from flows.release_run import Release, Stop, judge_late, judge_stage
from tasks.common import artifact_key, emit, flush_events, log_labels_of_this_run
from tasks.evaluation import evaluate_candidate
from tasks.ledger import close_ledger, keep_forensics, open_ledger
from tasks.lock import release_lock
from tasks.preflight import verify_candidate
from tasks.registry import mark_rolled_back, promote_candidate, publish_candidate, set_status
from tasks.traffic import (
    probe_traffic,
    roll_back_on_crash,
    roll_back_traffic,
    shift_traffic,
    synthetic_traffic,
    warm_up_candidate,
)


def _preflight_and_publish(run: Release, floor: PolicyFloor) -> None:
    try:
        checked = verify_candidate(run.spec, floor, run.endpoints)
    except CanaryflowError as exc:
        run.stage(Stage.PREFLIGHT, Outcome.FAILED, str(exc))
        raise Stop(str(exc)) from exc
    run.baseline, run.record.baseline_version = checked.baseline, checked.baseline.version
    fit = checked.compatibility.describe()
    if checked.spec is not None and checked.spec != run.spec:  # windows lengthened to decide
        run.spec = checked.spec
    plan = "; ".join(checked.plan.lines()) if checked.plan else "no recent traffic to plan with"
    run.stage(Stage.PREFLIGHT, Outcome.PASSED, f"signed by {checked.key_id}; {fit}; {plan}")
    try:
        run.candidate = publish_candidate(run.spec, run.endpoints)
    except ArtifactError as exc:  # missing, unreadable or changed since signing: nothing published
        run.stage(Stage.PUBLISH, Outcome.FAILED, str(exc))
        raise Stop(str(exc)) from exc
    run.record.candidate_version = run.candidate.version
    run.stage(Stage.PUBLISH, Outcome.DONE, f"version {run.candidate.version} is the challenger")


def _offline_gate(run: Release) -> None:
    assert run.candidate is not None and run.baseline is not None
    report = evaluate_candidate(run.spec, run.candidate, run.baseline, run.endpoints,
                                run.record.ledger_run_id)  # fmt: skip
    summary = report.findings()
    metrics = {f"{s.suite}_diff": s.diff for s in report.suites}
    if report.decision is Decision.FAIL:
        run.stage(Stage.OFFLINE_EVAL, Outcome.FAILED, summary, figures=metrics)
        raise Stop(f"offline gate failed: {summary}")
    if report.decision is not Decision.PASS:
        run.stage(Stage.OFFLINE_EVAL, Outcome.REVIEW, summary, figures=metrics)
        approved, verdict = run.ask_human(
            Stage.OFFLINE_EVAL, f"offline evaluation needs review: {summary}", "offline",
            artifact_key("offline-eval", run.spec.service), report.unsure,
        )  # fmt: skip
        if not approved:
            raise Stop(f"offline_eval review rejected by {verdict}")
        return
    run.stage(Stage.OFFLINE_EVAL, Outcome.PASSED, report.headline(), figures=metrics)


def _shadow(run: Release) -> None:
    shadow, max_extensions = run.spec.shadow, run.spec.canary.max_extensions
    assert run.candidate is not None
    if not shadow.enabled:
        run.stage(Stage.SHADOW, Outcome.SKIPPED, "disabled in the spec")
        return
    routes = shift_traffic(
        run.routes(shadow=run.candidate.version, mirror_percent=shadow.mirror_percent),
        run.endpoints,
    )
    set_status(run.spec.service, run.candidate.version, "shadow", run.endpoints)
    windows = max(1, round(shadow.duration_s / max(shadow.window_s, 0.001)))
    judge_stage(run, Stage.SHADOW, routes, 0, Limits(windows, max_extensions), shadow.window_s)
    run.stage(
        Stage.SHADOW, Outcome.PASSED, f"{windows} window(s) at {shadow.mirror_percent:g}% mirror"
    )


def _canary(run: Release) -> None:
    assert run.candidate is not None
    set_status(run.spec.service, run.candidate.version, "canary", run.endpoints)
    for step, plan in enumerate(run.spec.canary.steps):
        routes = shift_traffic(
            run.routes(canary=run.candidate.version, weight=plan.weight), run.endpoints
        )
        limits = Limits(plan.windows, run.spec.canary.max_extensions)
        judge_stage(run, Stage.CANARY, routes, step, limits, plan.window_s)
        run.stage(Stage.CANARY, Outcome.PASSED, f"{plan.windows} window(s) at {plan.weight:g}%",
                  part=f"{plan.weight:g}pct", figures={"weight": plan.weight})  # fmt: skip


def _promote(run: Release) -> None:
    assert run.candidate is not None
    await_promotion_window(run)  # the spec's promotion window, if any: wait, then judge again
    shift_traffic(Routes(service=run.spec.service, stable=run.candidate.version), run.endpoints)
    previous = promote_candidate(run.spec.service, run.candidate.version, run.endpoints)
    run.record.promote()
    run.stage(Stage.PROMOTE, Outcome.DONE,
              f"champion v{run.candidate.version}; last-stable v{previous}")  # fmt: skip


def _roll_back(run: Release, stop: Stop) -> None:
    """Traffic first, in one call; then the forensics bundle, then the registry."""
    run.record.reason = stop.reason
    run.record.decision = ReleaseDecision.REJECTED
    if run.candidate is None:  # refused before anything was published
        return
    if run.live_since is not None:
        change = roll_back_traffic(run.spec.service, run.endpoints)
        if stop.breach_at is not None:
            run.record.breach_to_stable_ms = (
                datetime.now(UTC) - stop.breach_at
            ).total_seconds() * 1e3
        figures = {"rollback_ms": change.rollback_ms,
                   "breach_to_stable_ms": run.record.breach_to_stable_ms or 0.0}  # fmt: skip
        run.stage(Stage.ROLLBACK, Outcome.DONE, change.describe(), figures=figures)
        run.record.decision = ReleaseDecision.ROLLED_BACK
        keep_forensics(run.record, run.endpoints, since=run.live_since, change=change,
                       windows=run.windows)  # fmt: skip
    mark_rolled_back(run.spec.service, run.candidate.version, stop.reason, run.endpoints)


@flow(name="release", on_crashed=[roll_back_on_crash], on_cancellation=[roll_back_on_crash],
      on_failure=[roll_back_on_crash])  # fmt: skip
def release(spec: ReleaseSpec) -> ReleaseRecord:
    """Release `spec.candidate` for `spec.service`, or refuse it and keep the evidence."""
    # The worker's own: endpoints, trust store and floors never come from a delivery.
    settings, endpoints = Settings(), worker_endpoints()
    with log_labels_of_this_run():
        record = _release(spec, settings, endpoints)
    flush_events()
    return record


def _release(spec: ReleaseSpec, settings: Settings, endpoints: Endpoints) -> ReleaseRecord:
    run = Release(spec, endpoints)
    started = time.perf_counter()
    with release_lock(spec.service, spec.lock_wait_s):
        run.record.ledger_run_id = open_ledger(run.record, spec, endpoints)
        try:
            _preflight_and_publish(run, settings.floor_for(spec.service))
            _offline_gate(run)
            assert run.candidate is not None
            warm_up_candidate(run.candidate.version, endpoints)
            probes = probe_traffic(spec, endpoints, run.candidate.version)  # the policy's
            with synthetic_traffic(spec, endpoints), probes:
                run.live_since = datetime.now(UTC)
                # Starts the silence clock of the rollback deployment's trigger (prefect.yaml).
                emit("live", "started", run.record.release_id, spec.service,
                     stable=run.record.baseline_version,
                     candidate=run.candidate.version)  # fmt: skip
                _shadow(run)
                _canary(run)
                judge_late(run)  # the last window's late finishers, before promoting
            _promote(run)
        except Stop as stop:
            _roll_back(run, stop)
        except RoutesChanged as exc:  # someone else (on-call) rolled back: stop, never re-apply
            _roll_back(run, Stop(f"the routes were changed outside this release: {exc}"))
        except BaseException as exc:
            _roll_back(run, Stop(f"release crashed: {type(exc).__name__}: {exc}"))
            close_ledger(run.record, endpoints)
            raise
        outcome = Outcome(run.record.decision.value)
        run.stage(Stage.RELEASE, outcome, run.record.reason,
                  figures={"seconds": time.perf_counter() - started})  # fmt: skip
        close_ledger(run.record, endpoints)
    return run.record
