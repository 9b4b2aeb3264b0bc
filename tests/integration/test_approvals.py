"""Answering a paused release against a real Prefect server, through a proxy that makes it busy.

A real flow run pauses for the Approval form (the soft gate's own `wait_for_approval`); the
proxy answers Prefect's retryable 503 on the exact path the answer takes, so each test shows
which call was made and that it reached Prefect in the end.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from prefect import flow
from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings

from canaryflow.app.approvals import paused_runs, resume_with_approval
from canaryflow.contracts import ApprovalConfig, ApprovalDecision
from canaryflow.errors import CanaryflowError, ConfigError
from tasks.approval import wait_for_approval
from tests.integration.busy_prefect import BusyPrefect
from tests.paused_runs import PausedRun, paused_flow_run

FLOW = "approval-probe"


@flow(name=FLOW)
def ask() -> ApprovalDecision:
    config = ApprovalConfig(timeout_s=120, poll_s=1)
    decision, _ = wait_for_approval("ship it?", config, "probe", "canary-probe-gates")
    return decision


@pytest.fixture
def paused_run(prefect_api: str) -> Iterator[PausedRun]:
    with paused_flow_run(
        ask, FLOW, f"probe-{uuid.uuid4().hex[:8]}", prefect_api, timeout_s=60
    ) as run:
        yield run


def test_resume_through_a_busy_api_reaches_prefect_and_the_run(
    busy_prefect: BusyPrefect, paused_run: PausedRun
) -> None:
    resume = f"/api/flow_runs/{paused_run.id}/resume"
    busy_prefect.fail(resume, times=2)
    status = resume_with_approval(
        busy_prefect.api_url, paused_run.id, approve=True, reason="ok", approver="alice"
    )
    assert status == "ACCEPT"
    statuses = [c[2] for c in busy_prefect.calls(resume)]
    # The two 503s the proxy made, then the real server's answers: it may itself be busy (a
    # locked SQLite database answers 503 under load) before it accepts.
    assert statuses[:2] == [503, 503] and statuses[-1] == 201, statuses
    assert set(statuses[2:-1]) <= {503}, statuses
    assert {c[:2] for c in busy_prefect.calls(resume)} == {("POST", resume)}
    assert busy_prefect.bodies(resume)[-1] == {
        "run_input": {"decision": "approve", "reason": "ok", "approver": "alice"}
    }
    assert paused_run.answer() == ApprovalDecision(approve=True, reason="ok", approver="alice")


def test_busy_past_the_retries_says_the_run_is_still_paused(
    busy_prefect: BusyPrefect, paused_run: PausedRun, prefect_api: str
) -> None:
    resume = f"/api/flow_runs/{paused_run.id}/resume"
    busy_prefect.fail(resume, times=100)
    with (
        temporary_settings(updates={PREFECT_CLIENT_MAX_RETRIES: 2}),
        pytest.raises(CanaryflowError, match=r"answered 503 .* still paused: try again"),
    ):
        resume_with_approval(
            busy_prefect.api_url, paused_run.id, approve=True, reason="ok", approver="alice"
        )
    assert busy_prefect.calls(resume) == [("POST", resume, 503)] * 3
    assert paused_run.id in [r["id"] for r in paused_runs(prefect_api, FLOW)]


def test_a_run_that_is_not_paused_is_refused_with_prefects_reason(
    busy_prefect: BusyPrefect, paused_run: PausedRun, prefect_api: str
) -> None:
    resume_with_approval(prefect_api, paused_run.id, approve=False, reason="no", approver="bob")
    resume = f"/api/flow_runs/{paused_run.id}/resume"
    busy_prefect.fail(resume, times=2)
    with pytest.raises(
        CanaryflowError, match=r"refused to resume .*: Cannot resume a flow run that is not paused"
    ):
        resume_with_approval(
            busy_prefect.api_url, paused_run.id, approve=True, reason="ok", approver="alice"
        )
    assert [c[2] for c in busy_prefect.calls(resume)] == [503, 503, 200]


def test_an_invalid_form_is_refused_and_the_run_stays_paused(
    busy_prefect: BusyPrefect, paused_run: PausedRun, prefect_api: str
) -> None:
    with pytest.raises(CanaryflowError, match=r"refused to resume .*decision"):
        resume_with_approval(
            busy_prefect.api_url,
            paused_run.id,
            approve="maybe",  # type: ignore[arg-type]
            reason="ok",
            approver="alice",
        )
    assert paused_run.id in [r["id"] for r in paused_runs(prefect_api, FLOW)]


def test_an_unknown_run_is_a_config_error_and_nothing_is_resumed(
    busy_prefect: BusyPrefect,
) -> None:
    run_id = str(uuid.uuid4())
    with pytest.raises(ConfigError, match="check the id in the Prefect UI"):
        resume_with_approval(busy_prefect.api_url, run_id, approve=True, reason="", approver="")
    assert busy_prefect.calls("/api/flow_runs/") == [("GET", f"/api/flow_runs/{run_id}", 404)]


def test_paused_runs_lists_the_waiting_run_through_prefects_filter(
    busy_prefect: BusyPrefect, paused_run: PausedRun
) -> None:
    busy_prefect.fail("/api/flow_runs/filter", times=1)
    runs = paused_runs(busy_prefect.api_url, FLOW)
    assert [r["id"] for r in runs] == [paused_run.id]
    assert runs[0]["state"]["type"] == "PAUSED"
    assert busy_prefect.calls("/api/flow_runs/filter") == [
        ("POST", "/api/flow_runs/filter", 503),
        ("POST", "/api/flow_runs/filter", 200),
    ]


@pytest.mark.parametrize(
    ("missing", "blank"), [("reason", ""), ("approver", ""), ("reason", "   ")]
)
def test_the_form_needs_a_reason_and_an_approver(
    paused_run: PausedRun, prefect_api: str, missing: str, blank: str
) -> None:
    """No field has a default: typing nothing and submitting never decides a release."""
    answer = {"reason": "ok", "approver": "alice", missing: blank}
    with pytest.raises(CanaryflowError, match=rf"refused to resume .*{missing}"):
        resume_with_approval(prefect_api, paused_run.id, approve=True, **answer)
    assert paused_run.id in [r["id"] for r in paused_runs(prefect_api, FLOW)]
