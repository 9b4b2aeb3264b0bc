"""The promote step's wait, with the clock, the wait and the judge replaced: what it records,
that it keeps the last canary weight, and that it judges once more before promoting."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest

from canaryflow.contracts import (
    CanaryPlan,
    CanaryStep,
    Outcome,
    PromotionWindow,
    ShadowConfig,
    Stage,
)
from flows import promotion

NIGHT = PromotionWindow(start="02:00", end="05:00", timezone="UTC")


class FakeRun:
    def __init__(self, window: PromotionWindow | None) -> None:
        plan = CanaryPlan(
            steps=[CanaryStep(weight=1, window_s=5), CanaryStep(weight=5, window_s=7)]
        )
        self.spec = SimpleNamespace(promote_within=window, canary=plan, shadow=ShadowConfig(),
                                    service="my-assistant")  # fmt: skip
        self.candidate = SimpleNamespace(version="8")
        self.record = SimpleNamespace(release_id="r-1")
        self.windows = [SimpleNamespace(stage="canary", step=1, weight=5.0)]
        self.stages: list[tuple[Stage, Outcome, str, str | None]] = []

    def stage(self, stage: Stage, outcome: Outcome, detail: str = "", *, part: str | None = None,
              figures: dict[str, float] | None = None) -> None:  # fmt: skip
        self.stages.append((stage, outcome, detail, part))

    def routes(self, **split: Any) -> dict[str, Any]:
        return split


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    seen: list[tuple[str, Any]] = []
    monkeypatch.setattr(promotion, "wait_for_promotion_window",
                        lambda opens_at, *_: seen.append(("wait", opens_at)))  # fmt: skip

    def judge(run: Any, stage: Stage, routes: Any, step: int, limits: Any, window_s: float) -> None:
        seen.append(("judge", (stage, routes, step, limits.windows, window_s)))

    monkeypatch.setattr(promotion, "judge_stage", judge)
    monkeypatch.setattr(promotion, "judge_late", lambda run: seen.append(("late", None)))
    return seen


def test_no_window_promotes_at_once(calls: list[tuple[str, Any]]) -> None:
    run = FakeRun(None)
    promotion.await_promotion_window(run)  # type: ignore[arg-type]
    assert calls == [] and run.stages == []


def test_inside_the_window_promotes_at_once(calls: list[tuple[str, Any]]) -> None:
    run = FakeRun(NIGHT)
    promotion.await_promotion_window(run, lambda: datetime(2026, 12, 2, 3, tzinfo=UTC))  # type: ignore[arg-type]
    assert calls == [] and run.stages == []


def test_outside_it_waits_at_the_last_weight_then_judges_once_more(
    calls: list[tuple[str, Any]],
) -> None:
    clock = iter(
        [datetime(2026, 12, 1, 22, 48, tzinfo=UTC), datetime(2026, 12, 2, 2, 1, tzinfo=UTC)]
    )
    run = FakeRun(NIGHT)
    promotion.await_promotion_window(run, lambda: next(clock))  # type: ignore[arg-type]
    assert calls == [
        ("wait", datetime(2026, 12, 2, 2, tzinfo=UTC)),
        ("judge", (Stage.CANARY, {"canary": "8", "weight": 5.0}, 2, 1, 7)),
        ("late", None),
    ]
    (stage, outcome, detail, part), last = run.stages
    assert (stage, outcome, part) == (Stage.PROMOTE, Outcome.WAITING, "window")
    assert detail.startswith(
        "waiting for the promotion window 02:00-05:00 UTC, opens in 3 h 12 min"
    )
    assert last[:2] == (Stage.CANARY, Outcome.PASSED) and last[3] == "promotion_window"


def test_a_judge_that_runs_past_the_window_waits_again(calls: list[tuple[str, Any]]) -> None:
    clock = iter([datetime(2026, 12, 1, 22, tzinfo=UTC), datetime(2026, 12, 2, 5, 0, tzinfo=UTC),
                  datetime(2026, 12, 3, 2, 30, tzinfo=UTC)])  # fmt: skip
    run = FakeRun(NIGHT)
    promotion.await_promotion_window(run, lambda: next(clock))  # type: ignore[arg-type]
    assert [c for c, _ in calls] == ["wait", "judge", "late", "wait", "judge", "late"]
