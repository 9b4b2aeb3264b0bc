"""What counts as an error for the error gate: what a user sees fail."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from canaryflow.analysis.samples import RoleSample, counts_as_error
from canaryflow.contracts import RequestRecord, Role


@pytest.mark.parametrize(
    ("status", "error"),
    [(200, False), (400, False), (404, False), (408, True), (429, True), (500, True), (504, True)],
)
def test_user_visible_failures_are_errors(status: int, error: bool) -> None:
    assert counts_as_error(status) is error


def test_a_window_counts_rate_limits_and_timeouts_as_errors() -> None:
    statuses = [200, 200, 400, 408, 429, 503]
    records = [
        RequestRecord(
            request_id=f"r{i}",
            at=datetime.now(UTC),
            service="s",
            version="1",
            role=Role.CANARY,
            status=status,
            latency_ms=5.0,
        )
        for i, status in enumerate(statuses)
    ]
    sample = RoleSample.from_records(records)
    assert (sample.n, sample.errors) == (6, 3)
