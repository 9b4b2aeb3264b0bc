"""Detection: how fast the live judges catch real regressions, and how rarely they cry wolf.

Releases are simulated by calling the project's own judges on synthetic per-request samples:
each window's `WindowSample` holds what `RoleSample.from_records` would build from the store's
records (requests, 5xx, every latency, per-request cost, the answers the live LLM judge checked
and flagged), and goes through `gates.judge_sample` and `progress.observe` window by window with
one `GateMemory` carried from the first shadow window through every canary step, as
`flows/release_run.py` does. A review (ASK) ends a simulated release: it is counted as asked,
not rolled back. The late look is not simulated (it holds only the requests in flight when the
last window ends).

Traffic: Poisson arrivals at the row's rate; a canary's requests are a binomial share of them
(the observed split), stable serves the rest; a shadow sees the mirrored share of stable's.
Latency: lognormal, median 1,000 ms, sigma 0.35. Check sampling: which answers the LLM judge
checks is decided per request by the project's own `quality.pipeline.Sampler` (sample rate and
per-role floor), run on a Poisson stream at each role's rate to measure the share it takes.

Two comparison judges run on the same windows (labelled "comparison"; no goal of their own):
- Flagger-style: fixed thresholds per window on the candidate alone (success rate >= 99%,
  p99 latency <= 1.2 x stable's p99 before the release, hallucination rate <= the policy's
  0.5% ceiling as a custom metric); rollback after 5 failed checks (Flagger's `threshold`).
- Kayenta-style: per window, a two-sided Mann-Whitney test at alpha 0.05 per metric
  (latency, error indicator, hallucination indicator of the checked answers; tie-corrected
  normal approximation); a window fails when any metric fails; the release after one.

Speed: statistics the judges compute only as evidence (exact binomial interval and window
p-value, Fisher's test, Mann-Whitney's p, Hodges-Lehmann, the bootstrap p95 ratio) do not
decide anything; they are replaced by stubs unless `--exact-evidence`. Before the table, a few
releases are judged both ways and their decisions must be identical.

    python -m benchmarks.detection            # ~6-10 minutes on 2 cores
    python -m benchmarks.detection --quick    # ~1 minute, fewer releases per row
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from canaryflow.analysis import progress  # noqa: E402
from canaryflow.analysis.gates import GateMemory, judge_sample  # noqa: E402
from canaryflow.analysis.planning import adapted, plan_release  # noqa: E402
from canaryflow.analysis.progress import Action, Limits  # noqa: E402
from canaryflow.analysis.samples import RoleSample, WindowSample  # noqa: E402
from canaryflow.contracts import (  # noqa: E402
    CanaryPlan,
    CanaryStep,
    Decision,
    GatePolicy,
    Label,
    LlmJudgeChecker,
    ModerationChecker,
    ReleaseSpec,
    ShadowConfig,
    WindowResult,
)
from canaryflow.loading import load_policy  # noqa: E402
from canaryflow.stats.anytime import mann_whitney_z  # noqa: E402
from canaryflow.stats.proportions import wilson_interval  # noqa: E402

SEED = 20261203
POLICY_FILE = ROOT / "deployments" / "policies" / "default.yaml"
MEDIAN_MS, SIGMA = 1000.0, 0.35
UNSAFE_RATE = 0.0002  # both roles, below the 0.1% ceiling
EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
# Comparison judges
FLAGGER_MAX_ERROR = 0.01
FLAGGER_P99_MS = 1.2 * MEDIAN_MS * math.exp(SIGMA * 2.3263)  # 1.2 x stable's true p99
FLAGGER_THRESHOLD = 5
KAYENTA_Z = 1.959964  # two-sided alpha 0.05


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Stage:
    name: str  # "shadow" or "canary"
    share: float  # nominal: the canary weight, or the mirror's share
    window_s: float
    limits: Limits
    observed: float | None = None  # the canary's observed share, when it differs


@dataclass(frozen=True)
class Roles:
    """One role's behaviour: error and hallucination rates, latency shape."""

    error: float = 0.01
    hallucination: float = 0.003
    scale: float = 1.0  # every latency x this
    sigma: float = SIGMA
    tail_share: float = 0.0  # this share of requests ...
    tail_factor: float = 1.0  # ... this many times slower


@dataclass(frozen=True)
class Case:
    key: str
    label: str
    rps: float
    stages: tuple[Stage, ...]
    stable: Roles = Roles()
    candidate: Roles = Roles()
    every_checked: bool = False
    kind: str = "power"  # power: share caught; aa: share rolled back; blame: rolled back/asked
    goal: str = ""
    goal_s: float | None = None  # power: t90 at most this
    goal_share: float | None = None  # aa/blame: rolled back at most this
    blamed_by: str | None = None  # blame: the goal counts only rollbacks by this gate
    n: int = 1000
    n_quick: int = 60
    comparisons: bool = False
    refused: bool | None = None  # whole-release rows: preflight refused the spec as given
    note: str = ""


def canary(share: float, window_s: float, windows: int, observed: float | None = None) -> Stage:
    return Stage("canary", share, window_s, Limits(windows, 2), observed)


def single(windows: int = 30, window_s: float = 60.0, observed: float | None = None) -> tuple:
    return (canary(0.05, window_s, windows, observed),)


@cache
def signed_candidate() -> Any:
    from canaryflow.local import examples
    from canaryflow.registry.signing import generate_keypair, sign

    with tempfile.TemporaryDirectory() as folder:
        keys = generate_keypair(Path(folder), "bench", [examples.SERVICE])
        return sign(examples.manifest("1.2", "sandbox-good"), keys.private_path)


def release_spec(policy: GatePolicy, shadow: ShadowConfig, steps: list[CanaryStep]) -> ReleaseSpec:
    from canaryflow.local import examples

    return ReleaseSpec(
        service=examples.SERVICE,
        candidate=signed_candidate(),
        shadow=shadow,
        canary=CanaryPlan(steps=steps),
        policy=policy,
    )


def stages_of(spec: ReleaseSpec) -> tuple[Stage, ...]:
    """The stages `flows/release.py` runs for `spec`: shadow windows, then each canary step."""
    limits_ext = spec.canary.max_extensions
    found = []
    if spec.shadow.enabled:
        windows = max(1, round(spec.shadow.duration_s / max(spec.shadow.window_s, 0.001)))
        found.append(
            Stage(
                "shadow",
                spec.shadow.mirror_percent / 100,
                spec.shadow.window_s,
                Limits(windows, limits_ext),
            )
        )
    for step in spec.canary.steps:
        found.append(
            Stage("canary", step.weight / 100, step.window_s, Limits(step.windows, limits_ext))
        )
    return tuple(found)


def whole_release(policy: GatePolicy, rps: float) -> tuple[tuple[Stage, ...], bool, str]:
    """The default plan (shadow 4 x 15 s, canary 1/3/5% one 15 s window each) at `rps`:
    (the adapted plan's stages, refused as given, what adapting changed)."""
    spec = release_spec(policy, ShadowConfig(), CanaryPlan().steps)
    plan = plan_release(spec, rps)
    fitted = adapted(spec, plan)
    changed = ", ".join(
        f"{s.weight:g}% {s.window_s:g} s" for s in fitted.canary.steps if s.window_s != 15.0
    )
    return stages_of(fitted), bool(plan.problems), changed


def long_windows(policy: GatePolicy) -> tuple[Stage, ...]:
    """1 h shadow in 15-min windows, then the canary steps 1/3/5% with one 15-min window each."""
    shadow = ShadowConfig(duration_s=3600.0, window_s=900.0)
    steps = [CanaryStep(weight=w, window_s=900.0) for w in (1, 3, 5)]
    return stages_of(release_spec(policy, shadow, steps))


def cases(policy: GatePolicy) -> list[Case]:
    h = Roles(hallucination=0.003)
    found = [
        Case(
            "err2", "error rate 1% -> 2% (x2)", 100.0, single(),
            candidate=Roles(error=0.02), goal="caught, <= 600 s at p90", goal_s=600,
            comparisons=True,
        ),
        Case(
            "err3", "error rate 1% -> 3% (x3)", 100.0, single(),
            candidate=Roles(error=0.03), goal="<= 300 s at p90", goal_s=300,
        ),
        Case(
            "hal", "hallucination 0.3% -> 1.0%, default check sampling", 100.0, single(),
            stable=h, candidate=Roles(hallucination=0.01), goal="<= 540 s at p90", goal_s=540,
        ),
        Case(
            "hal_all", "hallucination 0.3% -> 1.0%, every answer checked", 100.0, single(),
            stable=h, candidate=Roles(hallucination=0.01), every_checked=True,
            goal="<= 540 s at p90", goal_s=540, comparisons=True,
        ),
        Case(
            "p50", "latency median +10%", 100.0, single(), candidate=Roles(scale=1.1),
            goal="<= 180 s at p90", goal_s=180, comparisons=True,
        ),
        Case(
            "p95", "latency p95 +30% (median unchanged, wider spread)", 100.0, single(),
            candidate=Roles(sigma=SIGMA + math.log(1.3) / 1.6449),
            goal="keep: t90 <= 120 s", goal_s=120,
        ),
        Case(
            "tail", "tail only: 5% of requests 4x slower", 100.0, single(),
            candidate=Roles(tail_share=0.05, tail_factor=4.0),
            goal="shown: <= 600 s at p90 (item 6)", goal_s=600, comparisons=True,
        ),
    ]  # fmt: skip
    for rps in (50.0, 100.0, 250.0):
        stages, refused, changed = whole_release(policy, rps)
        found.append(
            Case(
                f"aa{rps:g}", f"A/A, default plan (shadow 4x15 s; 1/3/5% x 15 s) at {rps:g} req/s",
                rps, stages, kind="aa", goal="<= 5% rolled back", goal_share=0.05,
                refused=refused,
                note=("adapted: " + changed) if changed else "plan as given",
            )
        )  # fmt: skip
    found += [
        Case(
            "aa120", "A/A, 120 windows of 15 s at 5% (continuous looks)", 100.0,
            single(120, 15.0), kind="aa", goal="<= 5% rolled back", goal_share=0.05, n=250,
            n_quick=30, comparisons=True,
        ),
        Case(
            "aa3", "A/A, observed split 3% at nominal 5%, 30 windows", 100.0,
            single(observed=0.03), kind="aa", goal="<= 5% rolled back", goal_share=0.05,
            comparisons=True, n=600, n_quick=40,
        ),
        Case(
            "blame", "equal candidate, both at 0.6% hallucination (ceiling 0.5%), "
            "1 h shadow + 15-min windows", 100.0, long_windows(policy),
            stable=Roles(hallucination=0.006), candidate=Roles(hallucination=0.006),
            kind="blame", goal="not blamed: rolled back by its gate <= 5% (asked allowed)",
            goal_share=0.05, blamed_by="hallucination_rate", n=150, n_quick=20,
        ),
        Case(
            "better", "better candidate, hallucination 0.8% -> 0.6%, same plan", 100.0,
            long_windows(policy), stable=Roles(hallucination=0.008),
            candidate=Roles(hallucination=0.006), kind="blame",
            goal="never rolled back by its gate", goal_share=0.0, blamed_by="hallucination_rate",
            n=150, n_quick=20,
        ),
    ]  # fmt: skip
    return found


# --------------------------------------------------------------------------- check sampling


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now


@cache
def sampled_share(kind: str, role: str, role_rps: float) -> float:
    """Share of a role's answers the default checker `kind` takes at `role_rps` answers per
    second: the project's Sampler on a Poisson stream (10 simulated minutes, fixed seed)."""
    from canaryflow.contracts.checkers import DEFAULT_CHECKERS
    from canaryflow.quality import pipeline

    if role_rps <= 0:
        return 0.0
    config = next(c for c in DEFAULT_CHECKERS if c.kind == kind)
    assert isinstance(config, LlmJudgeChecker | ModerationChecker)
    clock = _Clock()
    saved = pipeline.time
    pipeline.time = SimpleNamespace(monotonic=clock.monotonic)  # type: ignore[assignment]
    try:
        sampler = pipeline.Sampler(config, random.Random(SEED))
        arrivals = np.random.default_rng(SEED).exponential(1.0 / role_rps, int(role_rps * 600))
        taken = 0
        for gap in arrivals:
            clock.now += float(gap)
            if sampler.wants(role):
                sampler.took(role)
                taken += 1
    finally:
        pipeline.time = saved  # type: ignore[assignment]
    return taken / len(arrivals)


# --------------------------------------------------------------------------- samples


@dataclass
class Role:
    """One role's window, as arrays: what both the project's judges and the comparisons read."""

    n: int
    errors: int
    latencies: np.ndarray
    judged: int
    hallucinations: int
    unsafe_trials: int
    unsafe: int
    cost: float
    cost_sq: float

    def sample(self) -> RoleSample:
        return RoleSample(
            n=self.n,
            errors=self.errors,
            latencies_ms=tuple(self.latencies.tolist()),
            cost_usd=self.cost,
            cost_sq_usd=self.cost_sq,
            checked=self.n - self.errors,
            hallucinations=self.hallucinations,
            unsafe=self.unsafe,
            facts=self.judged,
            correct=self.judged - self.hallucinations,
            hallucination_trials=self.judged,
            unsafe_trials=self.unsafe_trials,
        )


def draw_role(
    rng: np.random.Generator, n: int, roles: Roles, role: str, rps: float, every: bool
) -> Role:
    errors = int(rng.binomial(n, roles.error))
    latencies = roles.scale * MEDIAN_MS * np.exp(roles.sigma * rng.standard_normal(n))
    if roles.tail_share > 0:
        latencies[rng.random(n) < roles.tail_share] *= roles.tail_factor
    answered = n - errors
    answered_rps = rps * (1.0 - roles.error)
    if every:
        judged = answered
        moderated = 0
    else:
        judged = int(rng.binomial(answered, sampled_share("llm_judge", role, answered_rps)))
        moderated = int(
            rng.binomial(answered - judged, sampled_share("moderation", role, answered_rps))
        )
    costs = rng.gamma(4.0, 0.0005, n)
    return Role(
        n=n,
        errors=errors,
        latencies=latencies,
        judged=judged,
        hallucinations=int(rng.binomial(judged, roles.hallucination)),
        unsafe_trials=judged + moderated,
        unsafe=int(rng.binomial(judged + moderated, UNSAFE_RATE)),
        cost=float(costs.sum()),
        cost_sq=float((costs * costs).sum()),
    )


def draw_window(rng: np.random.Generator, case: Case, stage: Stage) -> tuple[Role, Role]:
    """(stable, candidate) of one window of `stage`."""
    total = int(rng.poisson(case.rps * stage.window_s))
    if stage.name == "shadow":
        nb, nc = total, int(rng.binomial(total, stage.share))
        rps_b, rps_c, role = case.rps, case.rps * stage.share, "shadow"
    else:
        share = stage.share if stage.observed is None else stage.observed
        nc = int(rng.binomial(total, share))
        nb = total - nc
        rps_b, rps_c, role = case.rps * (1 - share), case.rps * share, "canary"
    every = case.every_checked
    return (
        draw_role(rng, nb, case.stable, "stable", rps_b, every),
        draw_role(rng, nc, case.candidate, role, rps_c, every),
    )


# --------------------------------------------------------------------------- comparisons


def two_proportion_z(kc: int, nc: int, kb: int, nb: int) -> float:
    """Mann-Whitney z of two 0/1 samples with the tie correction: the pooled two-proportion z."""
    if nc == 0 or nb == 0:
        return 0.0
    pooled = (kc + kb) / (nc + nb)
    var = pooled * (1 - pooled) * (1 / nc + 1 / nb)
    return 0.0 if var <= 0 else (kc / nc - kb / nb) / math.sqrt(var)


def flagger_fails(cand: Role) -> bool:
    if cand.n == 0:
        return True  # no metric data: Flagger counts a failed check
    p99 = float(np.quantile(cand.latencies, 0.99))
    hallucinated = cand.judged > 0 and cand.hallucinations / cand.judged > 0.005
    return cand.errors / cand.n > FLAGGER_MAX_ERROR or p99 > FLAGGER_P99_MS or hallucinated


def kayenta_fails(base: Role, cand: Role) -> bool:
    if min(base.n, cand.n) < 2:
        return True
    zs = (
        mann_whitney_z(cand.latencies, base.latencies),
        two_proportion_z(cand.errors, cand.n, base.errors, base.n),
        two_proportion_z(cand.hallucinations, cand.judged, base.hallucinations, base.judged),
    )
    return any(abs(z) > KAYENTA_Z for z in zs)


# --------------------------------------------------------------------------- one release


@dataclass
class Result:
    outcome: str  # rolled_back, no_data, asked, promoted
    seconds: float  # when the release stopped, asked or promoted
    flagger_s: float = math.inf  # when a comparison judge rolled back (inf: never)
    kayenta_s: float = math.inf
    gates: str = ""  # the gates that failed, asked or had no data in the deciding window


def simulate(case: Case, policy: GatePolicy, index: int) -> Result:
    """One release: windows judged by `judge_sample` and `progress.observe`, one memory."""
    rng = np.random.default_rng([SEED, sum(map(ord, case.key)), index])
    memory: GateMemory | None = None
    waived: frozenset[str] = frozenset()
    seconds = end_s = 0.0
    result: Result | None = None
    flagger_failed, flagger_s, kayenta_s = 0, math.inf, math.inf
    compare = case.comparisons and len(case.stages) == 1
    for step, stage in enumerate(case.stages):
        state = progress.start(stage.name, stage.limits, waived=waived, memory=memory)
        window, judging = 0, True
        while True:
            base, cand = draw_window(rng, case, stage)
            started = EPOCH + timedelta(seconds=seconds)
            seconds += stage.window_s
            window += 1
            if compare:
                if math.isinf(flagger_s) and flagger_fails(cand):
                    flagger_failed += 1
                    if flagger_failed >= FLAGGER_THRESHOLD:
                        flagger_s = seconds
                if math.isinf(kayenta_s) and kayenta_fails(base, cand):
                    kayenta_s = seconds
            if judging:
                sample = WindowSample(
                    baseline=base.sample(),
                    candidate=cand.sample(),
                    start=started,
                    end=EPOCH + timedelta(seconds=seconds),
                    candidate_role=stage.name,
                )
                gates, decision, new_memory = judge_sample(policy, sample, state.memory)
                judged = WindowResult(
                    stage="shadow" if stage.name == "shadow" else "canary",
                    step=step,
                    weight=100 * stage.share,
                    window=state.looks,
                    started_at=started,
                    ended_at=sample.end or started,
                    gates=gates,
                    decision=decision,
                )
                state, next_step = progress.observe(state, judged, new_memory)
                if next_step.action in (Action.ASK, Action.STOP):
                    named = ",".join(sorted({g.gate for g in gates if g.label is not Label.PASS}))
                    if next_step.action is Action.ASK:
                        outcome = "asked"
                    else:
                        outcome = "rolled_back" if decision is Decision.FAIL else "no_data"
                    result = Result(outcome, seconds, gates=named)
                judging = result is None and next_step.action is not Action.DONE
                if not judging:
                    end_s = seconds
            # the comparisons judge the same windows, up to the stage's planned length
            comparing = compare and window < stage.limits.windows
            comparing = comparing and (math.isinf(flagger_s) or math.isinf(kayenta_s))
            if not (judging or comparing):
                break
        if result is not None:
            break
        memory, waived = state.memory, state.waived
    seconds = end_s
    if result is None:
        result = Result("promoted", seconds)
    result.flagger_s, result.kayenta_s = flagger_s, kayenta_s
    return result


# --------------------------------------------------------------------------- evidence stubs


class _Binom:
    pvalue = float("nan")

    def proportion_ci(self, *args: object, **kwargs: object) -> SimpleNamespace:
        return SimpleNamespace(low=float("nan"), high=float("nan"))


def evidence_stubs() -> list[tuple[Any, str, Any]]:
    """(module, name, stub) for each evidence-only statistic of the judges: none of them decides
    a label (`rates._decide` and `latency.latency` read only the sequential states)."""
    import scipy.stats

    from canaryflow.analysis import latency

    nan = float("nan")
    return [
        (scipy.stats, "binomtest", lambda *a, **k: _Binom()),
        (scipy.stats, "fisher_exact", lambda *a, **k: SimpleNamespace(pvalue=nan)),
        (scipy.stats, "mannwhitneyu", lambda *a, **k: SimpleNamespace(pvalue=nan)),
        (latency, "hodges_lehmann", lambda *a, **k: (nan, nan, nan)),
    ]


def light_evidence() -> None:
    """Replace the judges' evidence-only statistics with stubs, in this process for good."""
    for module, name, stub in evidence_stubs():
        setattr(module, name, stub)


# --------------------------------------------------------------------------- running


_POLICY: GatePolicy | None = None
_CASES: dict[str, Case] = {}


def _init(policy: GatePolicy, all_cases: list[Case], light: bool) -> None:
    global _POLICY, _CASES
    _POLICY, _CASES = policy, {c.key: c for c in all_cases}
    if light:
        light_evidence()


def _run_chunk(job: tuple[str, int, int]) -> tuple[str, list[Result]]:
    key, start, stop = job
    assert _POLICY is not None
    return key, [simulate(_CASES[key], _POLICY, i) for i in range(start, stop)]


def chunks(todo: list[tuple[Case, int]], size: int = 10) -> Iterator[tuple[str, int, int]]:
    for case, n in todo:
        for start in range(0, n, size):
            yield case.key, start, min(n, start + size)


def warm_sampler(all_cases: list[Case]) -> None:
    """Measure every sampling share before forking, so workers share the cache."""
    rng = np.random.default_rng(0)
    for case in all_cases:
        if not case.every_checked:
            for stage in case.stages:
                draw_window(rng, case, stage)


def check_light_evidence(policy: GatePolicy, all_cases: list[Case], releases: int) -> None:
    """Judge `releases` releases of a few rows with and without the stubs: same decisions."""
    picked = [c for c in all_cases if c.key in ("err2", "p50", "aa100")]
    exact = {(c.key, i): simulate(c, policy, i) for c in picked for i in range(releases)}
    with multiprocessing.get_context("fork").Pool(
        1, _init, (policy, all_cases, True)
    ) as pool:  # a fresh process, so this one keeps the real statistics
        light = dict(
            ((key, i), r)
            for key, results in pool.map(_run_chunk, [(c.key, 0, releases) for c in picked])
            for i, r in enumerate(results)
        )
    for key, result in exact.items():
        other = light[key]
        if (result.outcome, result.seconds) != (other.outcome, other.seconds):
            raise SystemExit(f"evidence stubs changed a decision: {key}: {result} vs {other}")


# --------------------------------------------------------------------------- table


@dataclass
class Row:
    label: str
    n: int
    what: str  # "caught", "rolled back"
    k: int
    t50: str
    t90: str
    goal: str
    verdict: str
    extra: list[str] = field(default_factory=list)


def quantile_s(times: list[float], q: float) -> float:
    ordered = sorted(times)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def fmt_s(seconds: float, cap: float) -> str:
    return f"> {cap:,.0f}" if math.isinf(seconds) else f"{seconds:,.0f}"


def share(k: int, n: int) -> str:
    lo, hi = wilson_interval(k, n, 0.95)
    return f"{100 * k / n:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def by_gate(results: list[Result], outcome: str) -> str:
    counts: dict[str, int] = {}
    for r in results:
        if r.outcome == outcome:
            counts[r.gates] = counts.get(r.gates, 0) + 1
    return ", ".join(f"{gates or '?'} {k}" for gates, k in sorted(counts.items()))


def rows_of(case: Case, results: list[Result]) -> list[Row]:
    n = len(results)
    cap = sum(s.window_s * s.limits.windows for s in case.stages)
    out = []
    if case.kind == "power":
        times = [r.seconds if r.outcome in ("rolled_back", "asked") else math.inf for r in results]
        k = sum(not math.isinf(t) for t in times)
        t50, t90 = quantile_s(times, 0.5), quantile_s(times, 0.9)
        met = case.goal_s is not None and t90 <= case.goal_s
        row = Row(case.label, n, "caught", k, fmt_s(t50, cap), fmt_s(t90, cap), case.goal,
                  "MET" if met else "MISSED")  # fmt: skip
        asked = sum(r.outcome == "asked" for r in results)
        if asked:
            row.extra.append(f"{asked} of them asked (REVIEW): {by_gate(results, 'asked')}")
        if by := by_gate(results, "no_data"):
            row.extra.append(f"stopped for no data: {by}")
        out.append(row)
    else:
        k = sum(r.outcome in ("rolled_back", "no_data") for r in results)
        no_data = sum(r.outcome == "no_data" for r in results)
        asked = sum(r.outcome == "asked" for r in results)
        assert case.goal_share is not None
        blamed = k
        if case.blamed_by is not None:
            blamed = sum(
                r.outcome == "rolled_back" and case.blamed_by in r.gates.split(",") for r in results
            )
        met = blamed / n <= case.goal_share if case.goal_share > 0 else blamed == 0
        label = case.label
        row = Row(label, n, "rolled back", k, "-", "-", case.goal, "MET" if met else "MISSED")
        if case.blamed_by is not None:
            row.extra.append(f"rolled back by {case.blamed_by}: {share(blamed, n)}")
        if case.refused is not None:
            row.extra.append(
                f"preflight {'refused' if case.refused else 'accepted'} the plan as given "
                f"({100.0 if case.refused else 0.0:.0f}% of releases); {case.note}"
            )
        if no_data:
            row.extra.append(f"{no_data} of them for no data (3 inconclusive windows)")
        row.extra.append(f"asked (REVIEW) {share(asked, n)}")
        for outcome in ("rolled_back", "no_data", "asked"):
            if by := by_gate(results, outcome):
                row.extra.append(f"{outcome.replace('_', ' ')} by: {by}")
        out.append(row)
    if case.comparisons:
        for name, attr in (("Flagger-style", "flagger_s"), ("Kayenta-style", "kayenta_s")):
            times = [getattr(r, attr) for r in results]
            k = sum(not math.isinf(t) for t in times)
            what = "caught" if case.kind == "power" else "rolled back"
            t50 = fmt_s(quantile_s(times, 0.5), cap) if case.kind == "power" else "-"
            t90 = fmt_s(quantile_s(times, 0.9), cap) if case.kind == "power" else "-"
            out.append(Row(f"  comparison: {name}, same samples", n, what, k, t50, t90,
                           "-", "-"))  # fmt: skip
    return out


def render(rows: list[Row]) -> str:
    head = f"{'case':<86} {'n':>5}  {'share [95% CI]':<32} {'t50 s':>7} {'t90 s':>7}  goal"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.label:<86} {r.n:>5}  {r.what + ' ' + share(r.k, r.n):<32} {r.t50:>7} "
            f"{r.t90:>7}  {r.goal}{': ' + r.verdict if r.verdict != '-' else ''}"
        )
        lines += [f"{'':<8}{extra}" for extra in r.extra]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer releases per row")
    parser.add_argument("--only", action="append", default=[], metavar="KEY")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--exact-evidence", action="store_true", help="keep the evidence-only statistics"
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    policy = load_policy(POLICY_FILE)
    all_cases = cases(policy)
    picked = [c for c in all_cases if not args.only or c.key in args.only]
    warm_sampler(picked)
    if not args.exact_evidence:
        check_light_evidence(policy, all_cases, 3 if args.quick else 10)
    todo = [(c, c.n_quick if args.quick else c.n) for c in picked]
    results: dict[str, list[tuple[int, list[Result]]]] = {c.key: [] for c in picked}
    jobs = list(chunks(todo))
    order = {job: i for i, job in enumerate(jobs)}
    with multiprocessing.get_context("fork").Pool(
        args.workers, _init, (policy, all_cases, not args.exact_evidence)
    ) as pool:
        for job, (key, found) in zip(jobs, pool.imap(_run_chunk, jobs), strict=True):
            results[key].append((order[job], found))
    rows: list[Row] = []
    for case in picked:
        ordered = [r for _, found in sorted(results[case.key], key=lambda p: p[0]) for r in found]
        rows += rows_of(case, ordered)
    elapsed = time.monotonic() - started
    print(
        f"Detection: the project's judges (judge_sample + progress.observe, default policy, "
        f"alpha 0.05 per release over {len(policy.live)} gates) on synthetic samples; seed {SEED}"
    )
    print(
        "single-stage rows: 5% canary of 100 req/s, 60 s windows, up to 30 windows; caught = "
        "rolled back or asked; t50/t90 over all releases (> cap: not caught within the plan)"
    )
    print(f"comparisons: Flagger-style (fixed thresholds, {FLAGGER_THRESHOLD} failed checks) and "
          "Kayenta-style (per-window Mann-Whitney, alpha 0.05 per metric)")  # fmt: skip
    print()
    print(render(rows))
    evidence = "exact" if args.exact_evidence else "stubbed"
    mode = "--quick, " if args.quick else ""
    print(f"\n{mode}{args.workers} worker(s), {evidence} evidence; total {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
