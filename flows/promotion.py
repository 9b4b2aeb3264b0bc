"""The promote step's gate in time: wait for the spec's promotion window, then look once more.

A release that passes outside the window keeps the candidate at its last canary weight (never
more traffic) until the window opens, then judges one more window at that weight (and its late
finishers) before promoting: hours may have passed, and the traffic at night is not the traffic
of the afternoon. A spec without a window promotes at once.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from canaryflow.analysis import progress
from canaryflow.analysis.progress import Limits
from canaryflow.contracts import Outcome, Stage
from flows.release_run import Release, judge_late, judge_stage
from tasks.promotion import wait_for_promotion_window


def _utc_now() -> datetime:
    return datetime.now(UTC)


def await_promotion_window(run: Release, now: Callable[[], datetime] = _utc_now) -> None:
    """Return once the window is open and the candidate has passed one window inside it."""
    window = run.spec.promote_within
    if window is None:
        return
    check = progress.check_window(window, now())
    while not check.open:
        detail = progress.describe_wait(window, check)
        run.stage(Stage.PROMOTE, Outcome.WAITING, detail, part="window",
                  figures={"wait_s": check.wait_s})  # fmt: skip
        wait_for_promotion_window(check.opens_at, run.record.release_id, run.spec.service, detail)
        _judge_again(run)
        check = progress.check_window(window, now())


def _judge_again(run: Release) -> None:
    """One window at the weight the candidate waited at; a breach raises Stop (rollback)."""
    if not run.windows or run.candidate is None:
        return
    last = run.windows[-1]
    limits = Limits(1, run.spec.canary.max_extensions)
    # A step number of its own, so this window's evidence does not overwrite the last step's.
    step = last.step + 1
    if last.stage == "shadow":
        shadow = run.spec.shadow
        routes = run.routes(shadow=run.candidate.version, mirror_percent=shadow.mirror_percent)
        stage, window_s, share = Stage.SHADOW, shadow.window_s, f"{shadow.mirror_percent:g}% mirror"
    else:
        routes = run.routes(canary=run.candidate.version, weight=last.weight)
        plans = run.spec.canary.steps
        window_s = plans[min(last.step, len(plans) - 1)].window_s
        stage, share = Stage.CANARY, f"{last.weight:g}%"
    judge_stage(run, stage, routes, step, limits, window_s)
    judge_late(run)
    run.stage(stage, Outcome.PASSED, f"judged again at {share} inside the promotion window",
              part="promotion_window")  # fmt: skip
