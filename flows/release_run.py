"""One release run's state, and the stage loop that drives `canaryflow.analysis.progress`.

`flows/release.py` reads as the runbook; this is what it carries from stage to stage: the
record every stage appends to, the published versions, the windows judged so far, the gates a
human waived and the judge's memory.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from canaryflow.analysis import progress
from canaryflow.analysis.progress import Action, Limits, StageProgress
from canaryflow.contracts import (
    Decision,
    Endpoints,
    Outcome,
    PublishedVersion,
    ReleaseRecord,
    ReleaseSpec,
    Role,
    Routes,
    Stage,
    StageOutcome,
    Waiver,
    WindowResult,
)
from tasks.analysis import judge_late_records, judge_window
from tasks.approval import approval_heartbeat, heartbeat_every, wait_for_approval
from tasks.common import artifact_key, emit, label_logs, say, silence_within_s
from tasks.ledger import log_evidence, record_stage


class Stop(Exception):
    """A gate (or a human) said no: roll back if traffic moved, and record why."""

    def __init__(self, reason: str, breach_at: datetime | None = None) -> None:
        super().__init__(reason)
        self.reason, self.breach_at = reason, breach_at


class Release:
    """What one run carries from stage to stage: the record, the versions, the judge's state."""

    def __init__(self, spec: ReleaseSpec, endpoints: Endpoints) -> None:
        self.spec, self.endpoints = spec, endpoints
        self.record = ReleaseRecord(
            release_id=f"{spec.service}-{datetime.now(UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}",
            service=spec.service,
            candidate=spec.candidate.manifest.model_id,
        )
        self.candidate: PublishedVersion | None = None
        self.baseline: PublishedVersion | None = None
        self.windows: list[WindowResult] = []
        self.live_since: datetime | None = None
        self.waived: frozenset[str] = frozenset()  # soft gates a human accepted in this release
        # The judge's sequential states: one per release, carried from the first shadow window
        # through the last canary step and the late look, so each gate spends its alpha once.
        self.memory: progress.GateMemory | None = None
        label_logs(self.record.release_id, spec.service)

    def stage(self, stage: Stage, outcome: Outcome, detail: str = "", *, part: str | None = None,
              figures: dict[str, float] | None = None) -> None:  # fmt: skip
        result = StageOutcome(stage=stage, part=part, outcome=outcome, detail=detail,
                              metrics=figures or {})  # fmt: skip
        version = self.candidate.version if self.candidate is not None else None
        label_logs(self.record.release_id, self.spec.service, version)
        record_stage(self.record, result, self.endpoints)
        self.record.stages.append(result)
        say("[%s] %s: %s", result.key, outcome.value, detail)

    def ask_human(
        self, stage: Stage, question: str, key: str, evidence_key: str, gates: tuple[str, ...]
    ) -> tuple[bool, str]:
        """Pause for the soft gate's answer: (approved, who and why). An approval waives
        `gates` for the rest of the release, and the record keeps who did it and why."""
        # A paused release is alive, and says so: the waiting event and a heartbeat every
        # quarter of the silence automation's `within` restart its clock; a process that dies
        # while it waits stops the beats, and the automation rolls the service back.
        emit(f"{stage}_approval", "waiting", self.record.release_id, self.spec.service, key=key)
        every_s = heartbeat_every(silence_within_s())
        with approval_heartbeat(self.record.release_id, self.spec.service, str(stage), key,
                                every_s):  # fmt: skip
            decision, timed_out = wait_for_approval(question, self.spec.approval, key, evidence_key)
        verdict = f"{decision.approver or 'unknown'}: {decision.reason or 'no reason given'}"
        outcome = Outcome.APPROVED if decision.approve else Outcome.REJECTED
        self.stage(
            stage, outcome, verdict, part="approval", figures={"timed_out": float(timed_out)}
        )
        if decision.approve:
            waiver = Waiver(stage=stage, gates=gates, approver=decision.approver,
                            reason=decision.reason)  # fmt: skip
            self.record.waivers.append(waiver)
        return decision.approve, verdict

    def routes(self, **split: Any) -> Routes:
        assert self.baseline is not None
        return Routes(service=self.spec.service, stable=self.baseline.version, **split)


def judge_stage(run: Release, stage: Stage, routes: Routes, step: int, limits: Limits,
                 window_s: float) -> None:  # fmt: skip
    """Windows until `progress` says DONE (return) or STOP (raise): the stage loop."""
    state: StageProgress = progress.start(stage, limits, waived=run.waived,
                                          memory=run.memory)  # fmt: skip
    while True:
        window, memory = judge_window(run.endpoints, run.spec.policy, stage, routes, step,
                                      state.looks, window_s, state.memory)  # fmt: skip
        run.windows.append(window)
        emit("window", window.decision.value, run.record.release_id, run.spec.service,
             stage=stage, step=step, window=state.looks, weight=window.weight)  # fmt: skip
        log_evidence(run.record, f"{stage}_s{step}_w{state.looks}",
                     window.model_dump(mode="json"), run.endpoints)  # fmt: skip
        state, next_step = progress.observe(state, window, memory)
        if next_step.action is Action.ASK:
            approved, verdict = run.ask_human(
                stage, next_step.reason, f"{stage}-{step}-{state.looks}",
                artifact_key(stage, run.spec.service, "gates"), tuple(sorted(state.asking)),
            )  # fmt: skip
            state, next_step = progress.answer(state, approved=approved, verdict=verdict)
        run.waived, run.memory = state.waived, state.memory
        if next_step.action is Action.STOP:
            raise Stop(next_step.reason, window.ended_at)
        if next_step.action is Action.DONE:
            return


def judge_late(run: Release) -> None:
    """Before promoting: the requests that started in the last judged window and completed
    after it (up to the services' provider timeout, or the spec's longer wait) against the hard
    gates. A breach raises Stop; the look's event restarts the silence clock like a window's."""
    if not run.windows or run.candidate is None or run.baseline is None:
        return
    last = run.windows[-1]
    shadow = last.stage == "shadow"
    routes = run.routes(shadow=run.candidate.version) if shadow else run.routes(
        canary=run.candidate.version, weight=last.weight)  # fmt: skip
    role = Role.SHADOW if shadow else Role.CANARY
    look = judge_late_records(run.endpoints, run.spec.policy, routes, role, last.ended_at,
                              run.spec.canary.late_records_s, run.memory)  # fmt: skip
    emit("window", look.decision.value, run.record.release_id, run.spec.service,
         stage="late", step=last.step, window=last.window)  # fmt: skip
    stage = Stage.SHADOW if shadow else Stage.CANARY
    figures = {"late_candidate": float(look.candidate_n), "late_baseline": float(look.baseline_n)}
    if look.decision is Decision.FAIL:
        run.stage(stage, Outcome.FAILED, look.describe(), part="late", figures=figures)
        raise Stop(look.describe(), datetime.now(UTC))
    run.stage(stage, Outcome.PASSED, look.describe(), part="late", figures=figures)
