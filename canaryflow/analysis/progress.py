"""The stage loop of a release as a pure state machine: judged windows in, the next step out.

A stage (shadow, or one canary step) needs `windows` passing windows. Each judged window moves
it on, Argo Rollouts' `assessMetricStatus` style, with explicit limits and no I/O or clock:

    PASS          counts; the stage is DONE after `windows` of them, else NEXT_WINDOW
    FAIL          STOP (the flow rolls back)
    REVIEW        ASK a human about the gates that asked, unless a human already accepted those
                  same gates earlier in this release; then it counts as a pass
    INCONCLUSIVE  NEXT_WINDOW (an extension); the `max_extensions`+1-th one is a STOP, since
                  no data is never a pass

After an ASK, `answer()` resumes: approved counts as a pass and waives those gates for the rest
of the release; rejected is a STOP. A stage therefore ends after at most
`windows + max_extensions + 1` looks. The sequential gates' states (`memory`) ride along
unchanged from window to window, and into the next stage when the caller passes them on: every
look at the same candidate counts against one budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum

from canaryflow.analysis.gates import GateMemory as GateMemory  # re-exported for the flow

# Re-exported for the flow: when it may promote (the spec's promotion window).
from canaryflow.analysis.promotion_window import WindowCheck as WindowCheck
from canaryflow.analysis.promotion_window import check_window as check_window
from canaryflow.analysis.promotion_window import describe_wait as describe_wait
from canaryflow.contracts import Decision, GateResult, Label, WindowResult


class Action(StrEnum):
    NEXT_WINDOW = "next_window"
    ASK = "ask"
    DONE = "done"
    STOP = "stop"


@dataclass(frozen=True)
class Limits:
    windows: int  # passing windows the stage needs
    max_extensions: int  # inconclusive windows it tolerates

    def __post_init__(self) -> None:
        if self.windows < 1 or self.max_extensions < 0:
            raise ValueError(f"a stage needs windows >= 1 and max_extensions >= 0, got {self}")


@dataclass(frozen=True)
class Next:
    action: Action
    reason: str = ""


@dataclass(frozen=True)
class StageProgress:
    """Where one stage stands. `waived` and `memory` carry over to the release's next stage."""

    name: str  # "shadow" or "canary": used in reasons a human reads
    limits: Limits
    passed: int = 0
    extensions: int = 0
    looks: int = 0
    waived: frozenset[str] = frozenset()
    asking: frozenset[str] = frozenset()  # gates a human is being asked about
    memory: GateMemory = field(default_factory=GateMemory)


def start(
    name: str,
    limits: Limits,
    *,
    waived: frozenset[str] = frozenset(),
    memory: GateMemory | None = None,
) -> StageProgress:
    return StageProgress(name=name, limits=limits, waived=waived, memory=memory or GateMemory())


def failing_gates(gates: tuple[GateResult, ...]) -> str:
    return "; ".join(f"{g.gate}: {g.reason}" for g in gates if g.label is not Label.PASS)


def observe(
    progress: StageProgress, window: WindowResult, memory: GateMemory | None = None
) -> tuple[StageProgress, Next]:
    """Take one judged window (and the judge's updated memory); say what comes next."""
    if progress.asking:
        raise ValueError(f"{progress.name}: answer the pending review before the next window")
    looked = replace(progress, looks=progress.looks + 1, memory=memory or progress.memory)
    failing = failing_gates(window.gates)
    if window.decision is Decision.PASS:
        return _count_pass(looked)
    if window.decision is Decision.FAIL:
        return looked, Next(Action.STOP, f"{progress.name} window {looked.looks} failed: {failing}")
    if window.decision is Decision.REVIEW:
        reviewing = frozenset(g.gate for g in window.gates if g.label is not Label.PASS)
        if reviewing <= progress.waived:  # a human already accepted these gates once
            return _count_pass(looked)
        return replace(looked, asking=reviewing), Next(
            Action.ASK, f"{progress.name} window {looked.looks} needs review: {failing}"
        )
    extended = replace(looked, extensions=looked.extensions + 1)
    if extended.extensions > progress.limits.max_extensions:
        return extended, Next(
            Action.STOP,
            f"{progress.name}: still inconclusive after {extended.extensions} extra windows "
            f"({failing}); no data is never a pass",
        )
    return extended, Next(Action.NEXT_WINDOW)


def answer(progress: StageProgress, *, approved: bool, verdict: str) -> tuple[StageProgress, Next]:
    """A human's answer to an ASK; `verdict` says who answered and why, for the record."""
    if not progress.asking:
        raise ValueError(f"{progress.name}: no review is pending")
    if not approved:
        return replace(progress, asking=frozenset()), Next(
            Action.STOP, f"{progress.name} review rejected by {verdict}"
        )
    waived = replace(progress, waived=progress.waived | progress.asking, asking=frozenset())
    return _count_pass(waived)


def _count_pass(progress: StageProgress) -> tuple[StageProgress, Next]:
    counted = replace(progress, passed=progress.passed + 1)
    done = counted.passed >= progress.limits.windows
    return counted, Next(Action.DONE if done else Action.NEXT_WINDOW)
