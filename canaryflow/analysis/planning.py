"""Can this release decide at this service's traffic? The plan preflight checks before publishing.

A window with fewer than `min_samples` requests of a role is never a pass (observability). At
100 req/s a 1% canary step gets ~15 candidate requests in a 15 s window: every window of it is
inconclusive, the extensions are too, and a healthy candidate is rolled back for want of data.
So preflight computes, from the service's recent user traffic, what each stage's windows will
hold (requests, and answers the LLM judge will check) and how long a window must be to reach
the floor; a spec that cannot decide is refused with those numbers, or, when the spec allows it
(`adapt_windows`), its short windows are lengthened to what is needed.

It also states what the plan can see: the smallest error-rate increase, as a ratio to stable's
rate, that the stage's requests detect with 80% power at the policy's alpha (a two-sample
one-sided test, normal approximation, at an assumed stable rate `ASSUMED_BASE_RATE`). Pure: no
I/O; the caller measures the traffic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from canaryflow.contracts import ReleaseSpec

ASSUMED_BASE_RATE = 0.01  # stable's error rate for the detectable-ratio figure
# A window sized for `min_samples` requests on average falls short about half the time (random
# arrivals), and three short windows in a row end a stage: sized for min_samples + 2.33 sd of
# a Poisson count instead, a window falls short about 1 time in 100.
SHORTFALL_Z = 2.33
POWER = 0.8
WINDOW_ROUND_S = 5.0  # an adapted window is rounded up to this
MAX_ADAPTED_WINDOW_S = 3600.0


@dataclass(frozen=True)
class StagePlan:
    """One stage (shadow, or a canary step) at the measured traffic."""

    name: str  # "shadow", "canary 5%"
    share: float  # of user requests the candidate sees (the mirror's share in shadow)
    window_s: float
    windows: int
    candidate_per_window: float  # requests
    judged_per_window: float  # answers the LLM judge checks (its sample rate and floor)
    window_needed_s: float  # for `min_samples` candidate requests per window (inf: no traffic)
    detectable_ratio: float  # error rate x this is detected over the stage (inf: never)

    @property
    def feasible(self) -> bool:
        return self.window_s + 1e-9 >= self.window_needed_s


@dataclass(frozen=True)
class ReleasePlan:
    rps: float  # users' requests per second, measured
    min_samples: int
    stages: tuple[StagePlan, ...]

    @property
    def problems(self) -> list[str]:
        """One sentence per stage that cannot decide, with the numbers."""
        return [
            f"{s.name}: at {self.rps:.1f} req/s a {s.window_s:g} s window sends "
            f"~{s.candidate_per_window:.1f} requests to the candidate; the gates need "
            f"{self.min_samples} in every window (~{_expected(self.min_samples):.0f} expected, "
            "so a window rarely falls short): make the window at least "
            f"{_rounded(s.window_needed_s):g} s"
            + (" or raise the weight" if s.name.startswith("canary") else "")
            for s in self.stages
            if not s.feasible
        ]

    def lines(self) -> list[str]:
        """What each stage will hold, for the preflight evidence."""
        return [
            f"{s.name}: {s.windows} x {s.window_s:g} s windows, ~{s.candidate_per_window:.0f} "
            f"candidate requests and ~{s.judged_per_window:.0f} judged answers per window; "
            f"detects an error rate x{s.detectable_ratio:.2f} over the stage "
            f"(stable at {ASSUMED_BASE_RATE:.0%}, power {POWER:.0%})"
            for s in self.stages
        ]


def _expected(floor: int) -> float:
    return floor + SHORTFALL_Z * math.sqrt(floor)


def _rounded(seconds: float) -> float:
    if math.isinf(seconds):
        return seconds
    return min(MAX_ADAPTED_WINDOW_S, math.ceil(seconds / WINDOW_ROUND_S) * WINDOW_ROUND_S)


def _judge_rate(spec: ReleaseSpec, role_rps: float) -> float:
    """Answers per second the LLM judge checks for the candidate with `role_rps` requests: its
    candidate sample rate, at least its per-role floor (never more than the answers)."""
    judges = [c for c in spec.policy.checkers if c.kind == "llm_judge"]
    if not judges:
        return 0.0
    judge = judges[0]
    return min(role_rps, max(judge.rate_for("canary") * role_rps, judge.min_per_s))


def detectable_ratio(n_candidate: float, n_baseline: float, alpha: float) -> float:
    """The smallest ratio r such that stable at ASSUMED_BASE_RATE vs the candidate at r times
    it is detected with POWER by a one-sided two-sample test at `alpha` (normal approximation)."""
    from scipy.stats import norm

    if n_candidate < 1 or n_baseline < 1:
        return math.inf
    z = float(norm.ppf(1 - alpha) + norm.ppf(POWER))
    p0 = ASSUMED_BASE_RATE
    low, high = 1.0, 1.0 / p0  # the candidate's rate cannot pass 1
    if (high * p0 - p0) < z * math.sqrt(p0 * (1 - p0) / n_baseline + 0.25 / n_candidate):
        return math.inf
    for _ in range(60):  # bisection on the ratio
        mid = (low + high) / 2
        p1 = min(1.0, mid * p0)
        needed = z * math.sqrt(p0 * (1 - p0) / n_baseline + p1 * (1 - p1) / n_candidate)
        low, high = (mid, high) if p1 - p0 < needed else (low, mid)
    return high


def plan_release(spec: ReleaseSpec, rps: float) -> ReleasePlan:
    """The stages of `spec` at `rps` users' requests per second."""
    floor = spec.policy.min_samples
    gates = max(1, len(spec.policy.live))
    alpha = spec.policy.alpha / gates  # per gate (the release's alpha split across its gates)
    stages: list[tuple[str, float, float, int]] = []
    if spec.shadow.enabled:
        windows = max(1, round(spec.shadow.duration_s / max(spec.shadow.window_s, 0.001)))
        stages.append(("shadow", spec.shadow.mirror_percent / 100, spec.shadow.window_s, windows))
    for step in spec.canary.steps:
        stages.append((f"canary {step.weight:g}%", step.weight / 100, step.window_s, step.windows))
    planned = []
    for name, share, window_s, windows in stages:
        role_rps = rps * share
        baseline_rps = rps if name == "shadow" else rps * (1 - share)
        needed = _expected(floor) / role_rps if role_rps > 0 else math.inf
        planned.append(
            StagePlan(
                name=name,
                share=share,
                window_s=window_s,
                windows=windows,
                candidate_per_window=role_rps * window_s,
                judged_per_window=_judge_rate(spec, role_rps) * window_s,
                window_needed_s=needed,
                detectable_ratio=detectable_ratio(
                    role_rps * window_s * windows, baseline_rps * window_s * windows, alpha
                ),
            )
        )
    return ReleasePlan(rps=rps, min_samples=floor, stages=tuple(planned))


def adapted(spec: ReleaseSpec, plan: ReleasePlan) -> ReleaseSpec:
    """`spec` with every window too short for the plan lengthened to what it needs (rounded up
    to WINDOW_ROUND_S); a stage with no traffic at all is left as it is (preflight refuses it)."""
    needed = {s.name: _rounded(s.window_needed_s) for s in plan.stages if not s.feasible}
    needed = {name: s for name, s in needed.items() if math.isfinite(s)}
    if not needed:
        return spec
    shadow = spec.shadow
    if "shadow" in needed:
        window = needed["shadow"]
        windows = max(1, round(shadow.duration_s / max(shadow.window_s, 0.001)))
        shadow = shadow.model_copy(update={"window_s": window, "duration_s": window * windows})
    steps = [
        step.model_copy(update={"window_s": needed.get(f"canary {step.weight:g}%", step.window_s)})
        for step in spec.canary.steps
    ]
    canary = spec.canary.model_copy(update={"steps": steps})
    return spec.model_copy(update={"shadow": shadow, "canary": canary})
