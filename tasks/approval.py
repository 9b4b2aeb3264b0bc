"""The soft gate: pause for a human, resumable from the Prefect UI or `canaryflow approve`."""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator
from typing import Annotated, Literal

from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.settings import PREFECT_UI_URL
from pydantic import Field, StringConstraints

from canaryflow.contracts import ApprovalConfig, ApprovalDecision
from tasks.common import emit, say

# Checked by the Prefect server against the form schema: blank is no answer.
Text = Annotated[str, StringConstraints(min_length=1, pattern=r"\S")]


class Approval(RunInput):
    """The form the Prefect UI shows on the paused run.

    No field has a default: a reviewer must pick a decision and give a reason. (With a boolean
    defaulting to off, typing a reason and submitting rejected the release.)
    """

    decision: Literal["approve", "reject"]
    reason: Text = Field(description="why: goes to the release ledger")
    approver: Text = Field(description="who answers")


def evidence_link(artifact_key: str) -> str:
    """Where the gate's evidence is in the Prefect UI, for the reviewer to read first."""
    ui = PREFECT_UI_URL.value()
    return f"{ui.rstrip('/')}/artifacts/key/{artifact_key}" if ui else f"artifact {artifact_key}"


def wait_for_approval(
    question: str, config: ApprovalConfig, key: str, evidence_key: str
) -> tuple[ApprovalDecision, bool]:
    """Returns (decision, timed_out). On timeout the policy's default applies, and says so."""
    from prefect.exceptions import FlowPauseTimeout

    evidence = evidence_link(evidence_key)
    say("waiting for approval: %s (evidence: %s)", question, evidence)
    try:
        answer = pause_flow_run(
            wait_for_input=Approval.with_initial_data(
                description=f"{question}\n\nEvidence: {evidence}"
            ),
            timeout=max(1, int(config.timeout_s)),
            poll_interval=int(config.poll_s),
            key=key,
        )
    except FlowPauseTimeout:
        approve = config.default_action == "approve"
        reason = (
            f"no answer within {config.timeout_s:g} s: policy default '{config.default_action}'"
        )
        return ApprovalDecision(approve=approve, reason=reason, approver="policy-default"), True
    decision = ApprovalDecision(
        approve=answer.decision == "approve", reason=answer.reason, approver=answer.approver
    )
    return decision, False


def heartbeat_every(within_s: float) -> float:
    """A quarter of the silence automation's `within`, kept between 1 s and 60 s: three beats
    in a row can be lost before the automation takes the paused release for dead."""
    return min(60.0, max(1.0, within_s / 4))


@contextlib.contextmanager
def approval_heartbeat(
    release_id: str, service: str, stage: str, key: str, every_s: float
) -> Iterator[threading.Event]:
    """`canaryflow.approval.heartbeat` every `every_s` from a background thread while the body
    (a pause for approval) blocks: each beat restarts the silence automation's clock, so a
    release whose process dies while it waits for a human is rolled back `within` later.

    Yields the thread's stop event (set on exit); setting it early stops the beats, as a dead
    process would.
    """
    stop = threading.Event()
    context = contextvars.copy_context()  # the Prefect client settings of the caller

    def beat() -> None:
        while not stop.wait(every_s):
            try:
                emit("approval", "heartbeat", release_id, service, stage=stage, key=key)
            except Exception as exc:  # a lost beat is what the automation is there for
                print(f"approval heartbeat of {release_id} not sent: {exc!r}")

    thread = threading.Thread(
        target=context.run, args=(beat,), name=f"approval-heartbeat-{key}", daemon=True
    )
    thread.start()
    try:
        yield stop
    finally:
        stop.set()
        thread.join(timeout=5)
