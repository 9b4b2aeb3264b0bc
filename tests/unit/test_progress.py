"""Every transition of the stage loop, fed literal windows."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from canaryflow.analysis.gates import GateMemory
from canaryflow.analysis.progress import Action, Limits, StageProgress, answer, observe, start
from canaryflow.contracts import Decision, GateResult, Label, Severity, WindowResult
from canaryflow.stats.sequential import SequentialState

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def window(decision: Decision, *bad: tuple[str, Label]) -> WindowResult:
    gates = [GateResult(gate="observability", severity=Severity.HARD, label=Label.PASS, reason="")]
    gates += [
        GateResult(gate=name, severity=Severity.SOFT, label=label, reason=f"{name} is off")
        for name, label in bad
    ]
    return WindowResult(
        stage="canary", step=0, weight=5, window=0, started_at=T0, ended_at=T0,
        gates=tuple(gates), decision=decision,
    )  # fmt: skip


PASS = window(Decision.PASS)
FAIL = window(Decision.FAIL, ("error_rate", Label.FAIL))
COST = window(Decision.REVIEW, ("cost_per_1k", Label.REVIEW))
ACCURACY = window(Decision.REVIEW, ("accuracy", Label.REVIEW))
NODATA = window(Decision.INCONCLUSIVE, ("observability", Label.NODATA))


def stage(windows: int = 2, max_extensions: int = 1, **kwargs: object) -> StageProgress:
    return start("canary", Limits(windows, max_extensions), **kwargs)  # type: ignore[arg-type]


def test_a_pass_short_of_the_windows_asks_for_the_next_window() -> None:
    progress, step = observe(stage(windows=2), PASS)
    assert step.action is Action.NEXT_WINDOW
    assert (progress.passed, progress.looks) == (1, 1)


def test_the_last_needed_pass_ends_the_stage() -> None:
    progress, _ = observe(stage(windows=2), PASS)
    progress, step = observe(progress, PASS)
    assert step.action is Action.DONE
    assert progress.passed == 2


def test_a_failed_window_stops_and_says_which_gate() -> None:
    progress, step = observe(stage(), FAIL)
    assert step.action is Action.STOP
    assert step.reason == "canary window 1 failed: error_rate: error_rate is off"
    assert progress.passed == 0


def test_a_review_asks_a_human_about_the_gates_that_asked() -> None:
    progress, step = observe(stage(), COST)
    assert step.action is Action.ASK
    assert "canary window 1 needs review: cost_per_1k" in step.reason
    assert progress.asking == frozenset({"cost_per_1k"})
    assert progress.passed == 0


def test_an_approved_review_counts_and_waives_those_gates() -> None:
    progress, _ = observe(stage(windows=2), COST)
    progress, step = answer(progress, approved=True, verdict="alice: launch")
    assert step.action is Action.NEXT_WINDOW
    assert (progress.passed, progress.waived, progress.asking) == (
        1,
        frozenset({"cost_per_1k"}),
        frozenset(),
    )


def test_an_approval_of_the_last_needed_window_ends_the_stage() -> None:
    progress, _ = observe(stage(windows=1), COST)
    _, step = answer(progress, approved=True, verdict="alice")
    assert step.action is Action.DONE


def test_a_rejected_review_stops() -> None:
    progress, _ = observe(stage(), COST)
    _, step = answer(progress, approved=False, verdict="bob: too expensive")
    assert step.action is Action.STOP
    assert step.reason == "canary review rejected by bob: too expensive"


def test_a_waived_gate_does_not_ask_again() -> None:
    progress, step = observe(stage(waived=frozenset({"cost_per_1k"})), COST)
    assert step.action is Action.NEXT_WINDOW
    assert progress.passed == 1


def test_a_waiver_covers_only_the_gates_a_human_saw() -> None:
    progress, step = observe(stage(waived=frozenset({"cost_per_1k"})), ACCURACY)
    assert step.action is Action.ASK
    assert progress.asking == frozenset({"accuracy"})


def test_an_inconclusive_window_extends_the_stage() -> None:
    progress, step = observe(stage(max_extensions=1), NODATA)
    assert step.action is Action.NEXT_WINDOW
    assert (progress.passed, progress.extensions) == (0, 1)


def test_extending_past_the_limit_stops_because_no_data_is_never_a_pass() -> None:
    progress, _ = observe(stage(max_extensions=1), NODATA)
    progress, step = observe(progress, NODATA)
    assert step.action is Action.STOP
    assert "still inconclusive after 2 extra windows" in step.reason
    assert "no data is never a pass" in step.reason


def test_extend_then_pass_then_stop_on_a_failure() -> None:
    progress = stage(windows=3, max_extensions=2)
    actions = []
    for w in (NODATA, PASS, NODATA, PASS, FAIL):
        progress, step = observe(progress, w)
        actions.append(step.action)
    assert actions == [Action.NEXT_WINDOW] * 4 + [Action.STOP]
    assert (progress.looks, progress.passed, progress.extensions) == (5, 2, 2)


def test_no_stage_outlives_its_limits() -> None:
    """Whatever the windows say, a stage ends within windows + max_extensions + 1 looks."""
    limits = Limits(windows=3, max_extensions=2)
    for sequence in ([NODATA] * 10, [PASS] * 10, [NODATA, PASS] * 5):
        progress, looks = start("canary", limits), 0
        for w in sequence:
            progress, step = observe(progress, w)
            looks += 1
            if step.action in (Action.DONE, Action.STOP):
                break
        assert step.action in (Action.DONE, Action.STOP)
        assert looks <= limits.windows + limits.max_extensions + 1


def test_a_window_while_a_review_is_pending_is_refused() -> None:
    progress, _ = observe(stage(), COST)
    with pytest.raises(ValueError, match="answer the pending review"):
        observe(progress, PASS)


def test_an_answer_without_a_question_is_refused() -> None:
    with pytest.raises(ValueError, match="no review is pending"):
        answer(stage(), approved=True, verdict="alice")


def test_the_judges_memory_rides_along() -> None:
    memory = GateMemory(rates={"error_rate<=0.02": SequentialState.start(0.02, 0.05)})
    progress, _ = observe(stage(), PASS, memory)
    assert progress.memory is memory
    progress, _ = observe(progress, PASS)  # no new memory: the old one stays
    assert progress.memory is memory


def test_limits_refuse_a_stage_that_could_never_pass() -> None:
    with pytest.raises(ValueError, match="windows >= 1"):
        Limits(windows=0, max_extensions=1)
