"""The last window's late finishers against the hard gates (pure: records in, verdict out)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from canaryflow.analysis.late import judge_late, late_finishers
from canaryflow.contracts import Decision, RequestRecord, Role
from canaryflow.loading import load_policy

POLICY = load_policy(Path(__file__).resolve().parents[2] / "deployments/policies/default.yaml")
END = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def record(i: int, role: Role, *, ends_after_s: float, latency_ms: float, status: int = 200):  # type: ignore[no-untyped-def]
    return RequestRecord(
        request_id=f"{role.value}-{i}",
        at=END + timedelta(seconds=ends_after_s),
        service="s",
        version="2" if role is Role.CANARY else "1",
        role=role,
        status=status,
        latency_ms=latency_ms,
    )


def test_only_requests_started_before_the_end_and_completed_after_it_are_late() -> None:
    records = [
        record(0, Role.CANARY, ends_after_s=-0.1, latency_ms=500),  # judged in the window
        record(1, Role.CANARY, ends_after_s=0.5, latency_ms=1000),  # late
        record(2, Role.CANARY, ends_after_s=0.5, latency_ms=100),  # started after the end
    ]
    assert [r.request_id for r in late_finishers(records, END)] == ["canary-1"]


def test_late_timeouts_fail_the_error_gate_and_a_healthy_tail_passes() -> None:
    stable = [record(i, Role.STABLE, ends_after_s=0.01, latency_ms=40) for i in range(5)]
    timeouts = [
        record(i, Role.CANARY, ends_after_s=1.2, latency_ms=1500, status=502) for i in range(40)
    ]
    look = judge_late(POLICY, stable, timeouts, END)
    assert look.decision is Decision.FAIL and look.candidate_n == 40
    assert "late records: 40 candidate request(s)" in look.describe()
    assert "error_rate" in look.describe()
    healthy = [record(i, Role.CANARY, ends_after_s=0.01, latency_ms=40) for i in range(40)]
    assert judge_late(POLICY, stable, healthy, END).decision is Decision.PASS


def test_no_late_finisher_is_a_pass_that_says_so() -> None:
    look = judge_late(POLICY, [], [], END)
    assert look.decision is Decision.PASS
    assert look.describe() == "no candidate request outlived the last window"
