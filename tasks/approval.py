"""The soft gate: pause for a human, resumable from the Prefect UI or `canaryflow approve`."""

from __future__ import annotations

from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput

from canaryflow.contracts import ApprovalConfig, ApprovalDecision
from tasks.common import say


class Approval(RunInput):
    """The form the Prefect UI shows on the paused run."""

    approve: bool = False
    reason: str = ""
    approver: str = ""


def wait_for_approval(
    question: str, config: ApprovalConfig, key: str
) -> tuple[ApprovalDecision, bool]:
    """Returns (decision, timed_out). On timeout the policy's default applies, and says so."""
    from prefect.exceptions import FlowPauseTimeout

    say("waiting for approval: %s", question)
    try:
        answer = pause_flow_run(
            wait_for_input=Approval.with_initial_data(
                description=question, approve=False, reason="", approver=""
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
    return (
        ApprovalDecision(approve=answer.approve, reason=answer.reason, approver=answer.approver),
        False,
    )
