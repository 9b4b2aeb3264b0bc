"""The last window's late finishers: requests that started before the release's last judged
window ended and completed after it.

A record carries its completion time, so such a request lands in a window nobody judges: the
release promotes right after its last window. Before promoting, the release waits until every
request that started in time has completed or hit the model service's provider timeout (a
request unfinished then is answered 502 and recorded as an error), and judges those records
against the policy's hard gates. Pure: records in, verdict out.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from canaryflow.analysis.gates import GateMemory, judge_sample
from canaryflow.analysis.samples import RoleSample, WindowSample
from canaryflow.contracts import (
    Decision,
    GatePolicy,
    GateResult,
    Label,
    RequestRecord,
    Severity,
)


@dataclass(frozen=True)
class LateLook:
    gates: tuple[GateResult, ...]
    decision: Decision  # FAIL (a hard gate breached) or PASS (nothing shown, or no late finisher)
    candidate_n: int
    baseline_n: int
    last_end: datetime

    def describe(self) -> str:
        failed = [g for g in self.gates if g.label in (Label.FAIL, Label.ERROR)]
        if failed:
            reasons = "; ".join(f"{g.gate}: {g.reason}" for g in failed)
            return (
                f"late records: {self.candidate_n} candidate request(s) completed after the "
                f"last window ended; {reasons}"
            )
        if self.candidate_n == 0:
            return "no candidate request outlived the last window"
        return (
            f"{self.candidate_n} candidate request(s) completed after the last window ended; "
            "no hard gate breached"
        )


def late_finishers(records: Iterable[RequestRecord], last_end: datetime) -> list[RequestRecord]:
    """Records that started before `last_end` and completed at or after it."""
    return [
        r
        for r in records
        if r.at >= last_end and r.at - timedelta(milliseconds=r.latency_ms) < last_end
    ]


def judge_late(
    policy: GatePolicy,
    baseline: Iterable[RequestRecord],
    candidate: Iterable[RequestRecord],
    last_end: datetime,
    memory: GateMemory | None = None,
) -> LateLook:
    """The late finishers of both roles against the policy's hard gates.

    `memory` is the stage's judge memory: the rate gates' e-processes go on from the windows
    already judged, so a handful of late errors counts with everything before it. Missing data
    is no reason to hold a promotion here (the windows were judged on their own); only a
    breach (FAIL or ERROR of a hard gate) fails the look.
    """
    late_baseline = late_finishers(baseline, last_end)
    late_candidate = late_finishers(candidate, last_end)
    if not late_candidate:
        return LateLook((), Decision.PASS, 0, len(late_baseline), last_end)
    sample = WindowSample(
        baseline=RoleSample.from_records(late_baseline),
        candidate=RoleSample.from_records(late_candidate),
        start=last_end,
        end=max(r.at for r in late_candidate),
    )
    # The whole policy, so each gate keeps its share of the alpha (and its running tests);
    # only the hard gates' verdicts count here.
    results, _, _ = judge_sample(policy, sample, memory)
    gates = tuple(g for g in results if g.severity is Severity.HARD)
    breached = any(g.label in (Label.FAIL, Label.ERROR) for g in gates)
    decision = Decision.FAIL if breached else Decision.PASS
    return LateLook(gates, decision, len(late_candidate), len(late_baseline), last_end)
