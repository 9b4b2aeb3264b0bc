"""Answering a paused release survives the Prefect API's retryable answers (503 under load)."""

from __future__ import annotations

import pytest

from canaryflow.app.approvals import resume_with_approval
from canaryflow.errors import CanaryflowError
from tests.integration.busy_prefect import BusyPrefect


def test_resume_retries_prefects_retryable_503(busy_prefect: str) -> None:
    BusyPrefect.busy, BusyPrefect.ok = 2, (200, {"status": "ACCEPT"})
    status = resume_with_approval(
        busy_prefect, "run-1", approve=True, reason="ok", approver="alice"
    )
    assert status == "ACCEPT"
    assert len(BusyPrefect.posts) == 3
    assert BusyPrefect.posts[-1] == {
        "run_input": {"approve": True, "reason": "ok", "approver": "alice"}
    }


def test_resume_gives_up_after_the_retries_with_a_clear_error(busy_prefect: str) -> None:
    BusyPrefect.busy = 100
    with pytest.raises(CanaryflowError, match=r"answered 503 .* still paused: try again"):
        resume_with_approval(busy_prefect, "run-1", approve=True, reason="ok", approver="alice")
    assert len(BusyPrefect.posts) == 5
