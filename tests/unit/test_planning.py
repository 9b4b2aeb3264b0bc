"""Preflight's plan: what each stage's windows hold at the service's traffic, and the refusal
(or the lengthened windows) when they cannot reach the gates' floor."""

from __future__ import annotations

import math
import tempfile
from functools import cache
from pathlib import Path

import pytest

from canaryflow.analysis.planning import adapted, detectable_ratio, plan_release
from canaryflow.contracts import CanaryPlan, CanaryStep, ReleaseSpec, ShadowConfig, SignedManifest
from canaryflow.local import examples
from canaryflow.registry.signing import generate_keypair, sign


@cache
def candidate() -> SignedManifest:
    with tempfile.TemporaryDirectory() as folder:
        keys = generate_keypair(Path(folder), "ci", [examples.SERVICE])
        return sign(examples.manifest("1.2", "sandbox-good"), keys.private_path)


def spec(**update: object) -> ReleaseSpec:
    base = ReleaseSpec(
        service=examples.SERVICE,
        candidate=candidate(),
        shadow=ShadowConfig(enabled=True, mirror_percent=100, duration_s=30, window_s=15),
        canary=CanaryPlan(steps=[CanaryStep(weight=w, window_s=15) for w in (1, 3, 5)]),
    )
    return base.model_copy(update=update)


def test_the_default_plan_at_100_rps_cannot_fill_its_small_steps_and_says_by_how_much() -> None:
    plan = plan_release(spec(), rps=100.0)
    by_name = {s.name: s for s in plan.stages}
    assert by_name["canary 1%"].candidate_per_window == pytest.approx(15.0)
    # 30 requests in every window: sized for 30 + 2.33 sd of a Poisson count, ~42.8 expected
    assert by_name["canary 1%"].window_needed_s == pytest.approx(42.76, abs=0.01)
    assert not by_name["canary 1%"].feasible
    assert not by_name["canary 1%"].feasible and by_name["canary 3%"].feasible
    assert by_name["shadow"].feasible
    (problem,) = plan.problems
    assert "canary 1%" in problem and "100.0 req/s" in problem and "~15.0 requests" in problem
    assert "at least 45 s" in problem


def test_enough_traffic_leaves_no_problem_and_the_figures_say_what_each_stage_sees() -> None:
    plan = plan_release(spec(), rps=1000.0)
    assert plan.problems == []
    lines = plan.lines()
    assert len(lines) == 4 and all("detects an error rate x" in line for line in lines)
    shadow = plan.stages[0]
    # the judge's candidate share (25% of 1,000 req/s) is above its floor of 12/s per role
    assert shadow.judged_per_window == pytest.approx(250.0 * 15)
    assert plan_release(spec(), rps=20.0).stages[0].judged_per_window == pytest.approx(12.0 * 15)


def test_no_traffic_to_a_stage_is_never_feasible() -> None:
    plan = plan_release(spec(), rps=0.0)
    assert all(math.isinf(s.window_needed_s) for s in plan.stages)
    assert len(plan.problems) == 4


def test_adapting_lengthens_only_the_short_windows_rounded_up() -> None:
    original = spec()
    plan = plan_release(original, rps=70.0)  # 1%: 0.7 req/s -> 61.1 s; 3%: 2.1/s -> 20.4 s
    changed = adapted(original, plan)
    windows = [s.window_s for s in changed.canary.steps]
    assert windows == [65.0, 25.0, 15.0]
    assert changed.shadow == original.shadow
    assert adapted(changed, plan_release(changed, rps=70.0)) == changed


def test_more_requests_detect_smaller_increases() -> None:
    small = detectable_ratio(1_000, 20_000, alpha=0.05 / 7)
    large = detectable_ratio(10_000, 200_000, alpha=0.05 / 7)
    assert 1.0 < large < small
    assert detectable_ratio(0, 100, 0.05) == math.inf
    # 1% -> 2% is a doubling; at 5% of 100 req/s for 10 min the stage should see it
    assert detectable_ratio(3_000, 57_000, alpha=0.05 / 7) < 2.0


def test_an_adapted_window_rarely_falls_short_of_the_floor() -> None:
    """Requests arrive at random: a window sized for the floor on average falls short about
    half the time, and three short windows end a stage. The plan's windows fall short ~1%."""
    from scipy.stats import poisson

    plan = plan_release(spec(), rps=100.0)
    step = next(s for s in plan.stages if s.name == "canary 1%")
    expected = step.window_needed_s * 100.0 * 0.01
    short = poisson.cdf(plan.min_samples - 1, expected)
    assert short < 0.02
    assert poisson.cdf(plan.min_samples - 1, plan.min_samples) > 0.4  # sized on the mean
