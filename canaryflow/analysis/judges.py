"""Statistics per metric: one window's baseline and candidate in, a GateResult with evidence out.

Pure functions: no I/O, no clock, a fixed bootstrap seed, so the same window always gets the
same verdict. Thresholds come from the gate, confidence from the policy's alpha; nothing here
is a literal a policy could want to change. Edge cases are labelled first (too few samples ->
NODATA); a breach of a hard gate is FAIL, of a soft gate REVIEW.

The effect gates (latency, cost, accuracy) share one rule: breach when the point estimate is
beyond the gate's tolerance AND the interval excludes "no change" (a real shift, not noise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from canaryflow.analysis.samples import RoleSample, WindowSample
from canaryflow.contracts import (
    Evidence,
    GatePolicy,
    GateResult,
    Label,
    LiveGate,
    LiveMetric,
    Severity,
)
from canaryflow.errors import PolicyError
from canaryflow.stats.estimators import (
    bootstrap_quantile,
    hodges_lehmann,
    nearest_rank,
    newcombe_interval,
)
from canaryflow.stats.sequential import SequentialState

P95 = 0.95
OBSERVABILITY_GATE = "observability"
# rate metric -> (events, trials) fields of RoleSample: errors per request, flags per answer
# a checker judged for that flag
RATE_FIELDS = {
    LiveMetric.ERROR_RATE: ("errors", "n"),
    LiveMetric.HALLUCINATION_RATE: ("hallucinations", "hallucination_n"),
    LiveMetric.UNSAFE_RATE: ("unsafe", "unsafe_n"),
}
QUALITY_RATES = frozenset({LiveMetric.HALLUCINATION_RATE, LiveMetric.UNSAFE_RATE})
RATE_METRICS = frozenset(RATE_FIELDS)


@dataclass(frozen=True)
class JudgeConfig:
    """What every judge needs from the policy besides its own gate."""

    alpha: float = 0.05
    min_samples: int = 30
    resamples: int = 2000
    seed: int = 20260112

    @classmethod
    def from_policy(cls, policy: GatePolicy) -> JudgeConfig:
        return cls(alpha=policy.alpha, min_samples=policy.min_samples)

    @property
    def z(self) -> float:
        from scipy.stats import norm

        return float(norm.ppf(1.0 - self.alpha / 2.0))


# --------------------------------------------------------------------------- helpers


def _threshold(gate: LiveGate, kind: str) -> float:
    value = getattr(gate, kind)
    if value is None:
        given = next(k for k in ("max_ratio", "max_rate", "margin") if getattr(gate, k) is not None)
        raise PolicyError(f"gate {gate.metric} needs {kind}, the policy gives {given}: change it")
    return float(value)


def _breach(gate: LiveGate) -> Label:
    return Label.REVIEW if gate.severity is Severity.SOFT else Label.FAIL


def _nodata(gate: LiveGate, what: str, nb: int, nc: int, need: int) -> GateResult | None:
    if nb >= need and nc >= need:
        return None
    return GateResult(
        gate=gate.metric,
        severity=gate.severity,
        label=Label.NODATA,
        reason=f"too few {what}: baseline {nb}, candidate {nc}; each role needs at least {need}",
        evidence=Evidence(n_baseline=nb, n_candidate=nc, threshold=float(need)),
    )


# --------------------------------------------------------------------------- judges


def observability(sample: WindowSample, config: JudgeConfig) -> GateResult:
    """Each role needs `min_samples` requests in the window: no data is never a pass."""
    nb, nc = sample.baseline.n, sample.candidate.n
    short = [f"{role} {n}" for role, n in (("baseline", nb), ("candidate", nc))]
    ok = min(nb, nc) >= config.min_samples
    reason = (
        f"requests: {', '.join(short)} (at least {config.min_samples} each)"
        if ok
        else f"too few requests: {', '.join(short)}; each role needs at least "
        f"{config.min_samples} per window: lengthen the window or raise the traffic share"
    )
    return GateResult(
        gate=OBSERVABILITY_GATE,
        severity=Severity.OBSERVABILITY,
        label=Label.PASS if ok else Label.NODATA,
        reason=reason,
        evidence=Evidence(
            n_baseline=nb,
            n_candidate=nc,
            threshold=float(config.min_samples),
            detail={
                "unchecked_baseline": sample.baseline.unchecked,
                "unchecked_candidate": sample.candidate.unchecked,
            },
        ),
    )


def latency_p95(gate: LiveGate, sample: WindowSample, config: JudgeConfig) -> GateResult:
    """p95 ratio candidate / baseline of the whole answer's latency; see `p95_ratio`."""
    return p95_ratio(
        gate, sample.baseline.latencies, sample.candidate.latencies, config, "latencies", "p95"
    )


def ttft_p95(gate: LiveGate, sample: WindowSample, config: JudgeConfig) -> GateResult:
    """p95 ratio of the time to first token of streamed answers: the wait a streaming user
    feels. A candidate can keep its total latency and still make users wait twice as long for
    the first word. Unstreamed answers are left out (they would dilute the shift); a window
    with no streamed answer at all is judged on latency, which is then the first token's."""
    base, cand = sample.baseline.ttfts, sample.candidate.ttfts
    if len(base) == 0 and len(cand) == 0:
        return p95_ratio(
            gate,
            sample.baseline.latencies,
            sample.candidate.latencies,
            config,
            "latencies",
            "no streamed answers; first token = whole answer: p95",
        )
    return p95_ratio(gate, base, cand, config, "streamed first-token times", "TTFT p95")


def p95_ratio(
    gate: LiveGate,
    baseline: npt.NDArray[np.float64],
    candidate: npt.NDArray[np.float64],
    config: JudgeConfig,
    what: str,
    label: str,
) -> GateResult:
    """p95 ratio candidate / baseline, with a bootstrap CI at 1 - alpha.

    Breach when the ratio's point estimate exceeds `max_ratio` AND the CI's lower bound is above
    1.0: the candidate is slower by more than the tolerance and the slowdown is not noise.
    Mann-Whitney U (one-sided: candidate slower) and the Hodges-Lehmann shift in ms with its
    interval are evidence a human reads; they do not decide.
    """
    from scipy.stats import mannwhitneyu

    max_ratio = _threshold(gate, "max_ratio")
    base, cand = np.sort(baseline), np.sort(candidate)
    missing = _nodata(gate, what, len(base), len(cand), config.min_samples)
    if missing is not None:
        return missing
    if not (np.isfinite(base).all() and np.isfinite(cand).all()):
        raise ValueError(f"{what} must be finite numbers of milliseconds")
    p95_b, p95_c = nearest_rank(base, P95), nearest_rank(cand, P95)
    if p95_b <= 0.0:
        raise ValueError(f"baseline {label} is {p95_b} ms: a ratio against it means nothing")
    rng = np.random.default_rng(config.seed)
    boot_b = bootstrap_quantile(base, P95, config.resamples, rng)
    boot_c = bootstrap_quantile(cand, P95, config.resamples, rng)
    ratios = boot_c / np.maximum(boot_b, np.finfo(np.float64).tiny)
    lo, hi = np.quantile(ratios, [config.alpha / 2.0, 1.0 - config.alpha / 2.0])
    ratio = p95_c / p95_b
    mw_p = float(mannwhitneyu(cand, base, alternative="greater").pvalue)
    shift, shift_lo, shift_hi = hodges_lehmann(base, cand, config.z)
    slower = ratio > max_ratio and lo > 1.0
    verdict = (
        f"{label} {p95_c:.1f} ms vs {p95_b:.1f} ms: ratio {ratio:.3f} "
        f"(CI {lo:.3f}-{hi:.3f}), limit {max_ratio:g}"
    )
    reason = ("candidate slower: " if slower else "") + verdict
    if ratio > max_ratio and not slower:
        reason += "; above the limit, but the CI reaches 1.0 (noise)"
    return GateResult(
        gate=gate.metric,
        severity=gate.severity,
        label=_breach(gate) if slower else Label.PASS,
        reason=reason,
        evidence=Evidence(
            n_baseline=len(base),
            n_candidate=len(cand),
            baseline=p95_b,
            candidate=p95_c,
            estimate=ratio,
            ci_low=float(lo),
            ci_high=float(hi),
            p_value=mw_p,
            threshold=max_ratio,
            detail={
                "hl_shift_ms": shift,
                "hl_ci_low_ms": shift_lo,
                "hl_ci_high_ms": shift_hi,
                "mann_whitney_p": mw_p,
                "p50_baseline_ms": nearest_rank(base, 0.5),
                "p50_candidate_ms": nearest_rank(cand, 0.5),
            },
        ),
    )


def rate_counts(metric: LiveMetric, role: RoleSample) -> tuple[int, int]:
    if metric not in RATE_FIELDS:
        raise ValueError(f"{metric} is not a rate metric")
    events, trials = RATE_FIELDS[metric]
    return int(getattr(role, events)), int(getattr(role, trials))


def rate(
    gate: LiveGate,
    sample: WindowSample,
    config: JudgeConfig,
    state: SequentialState | None = None,
) -> tuple[GateResult, SequentialState]:
    """Candidate's rate against the gate's `max_rate`, anytime-valid across windows.

    Rule: breach when the e-process over all windows so far (this one included) reaches
    1/alpha (see `sequential`): a candidate at or below the bound is failed with probability at
    most alpha however many windows are judged, while 8% over 200 checked answers against a
    0.5% bound fails in its first window (5 events in 200 suffice). Otherwise PASS once the
    windows so far hold `min_samples` trials, else NODATA; a breach is never hidden by a small
    sample.
    The window's exact one-sided binomial p-value, its Clopper-Pearson interval and Fisher's
    exact test against the baseline are evidence. Pass `state=None` for a first window; a state
    for another bound or alpha is restarted.
    """
    from scipy.stats import binomtest, fisher_exact

    bound = _threshold(gate, "max_rate")
    ec, nc = rate_counts(gate.metric, sample.candidate)
    eb, nb = rate_counts(gate.metric, sample.baseline)
    if state is None or state.bound != bound or state.alpha != config.alpha:
        state = SequentialState.start(bound, config.alpha)
    state = state.update(ec, nc)
    detail: dict[str, float | int | str] = {
        "e_value": state.e_value,
        "reject_at_e": 1.0 / config.alpha,
        "windows": state.windows,
        "cumulative_events": state.events,
        "cumulative_trials": state.trials,
        "events_baseline": eb,
        "events_candidate": ec,
    }
    if gate.metric in QUALITY_RATES:
        detail.update(checker_detail(sample.candidate))
    lo = hi = None
    if nc > 0:
        test = binomtest(ec, nc, bound, alternative="greater") if 0 < bound < 1 else None
        if test is not None:
            detail["window_binomial_p"] = float(test.pvalue)
        ci = binomtest(ec, nc).proportion_ci(1.0 - config.alpha, method="exact")
        lo, hi = float(ci.low), float(ci.high)
    if nc > 0 and nb > 0:
        table = [[ec, nc - ec], [eb, nb - eb]]
        detail["fisher_p_vs_baseline"] = float(fisher_exact(table, alternative="greater").pvalue)
    evidence = Evidence(
        n_baseline=nb,
        n_candidate=nc,
        baseline=eb / nb if nb else None,
        candidate=ec / nc if nc else None,
        estimate=ec / nc if nc else None,
        ci_low=lo,
        ci_high=hi,
        p_value=state.p_value,
        threshold=bound,
        detail=detail,
    )
    counts = f"{ec}/{nc} in this window, {state.events}/{state.trials} over {state.windows}"
    if state.rejected:
        label = _breach(gate)
        reason = (
            f"rate above {bound:g}: {counts} window(s); e-value {state.e_value:.3g} reached "
            f"1/alpha = {1 / config.alpha:g} in window {state.rejected_at}"
        )
    elif state.trials < config.min_samples:
        # The e-process accumulates evidence across windows, so the floor is cumulative too.
        label = Label.NODATA
        reason = f"too few trials: {counts} window(s); need at least {config.min_samples}"
        if gate.metric in QUALITY_RATES and (failing := checker_failures(sample.candidate)):
            reason += f"; the checkers failed: {failing}"
    else:
        label = Label.PASS
        reason = f"not shown above {bound:g}: {counts} window(s); e-value {state.e_value:.3g}"
    result = GateResult(
        gate=gate.metric, severity=gate.severity, label=label, reason=reason, evidence=evidence
    )
    return result, state


def checker_detail(role: RoleSample) -> dict[str, float | int | str]:
    """Per live checker of the role's answers (name/model/rubric version): how many it judged,
    failed and dropped in the window, and the unchecked answers."""
    detail: dict[str, float | int | str] = {"unchecked": role.unchecked}
    for label, outcomes in sorted(role.checkers.items()):
        for outcome in ("judged", "failed", "dropped"):
            detail[f"{label} {outcome}"] = outcomes.get(outcome, 0)
    return detail


def checker_failures(role: RoleSample) -> str:
    """'llm_judge/sandbox-judge/v1: 0 judged, 57 failed (judge failed: ...)' for each checker
    that failed on at least a fifth of the answers it took; '' when none did."""
    found = []
    for label, outcomes in sorted(role.checkers.items()):
        judged, failed = outcomes.get("judged", 0), outcomes.get("failed", 0)
        failed += outcomes.get("dropped", 0)
        if failed and failed * 5 >= judged + failed:
            why = role.failures.get(label)
            found.append(
                f"{label}: {judged} judged, {failed} failed" + (f" ({why})" if why else "")
            )
    return "; ".join(found)


def cost_per_1k(gate: LiveGate, sample: WindowSample, config: JudgeConfig) -> GateResult:
    """Cost per 1,000 requests, candidate / baseline, with a delta-method CI on the log ratio.

    Breach (REVIEW for the usual soft gate) when the ratio exceeds `max_ratio` AND the CI's
    lower bound is above 1.0.
    """
    max_ratio = _threshold(gate, "max_ratio")
    b, c = sample.baseline, sample.candidate
    if (missing := _nodata(gate, "requests", b.n, c.n, config.min_samples)) is not None:
        return missing
    mean_b, mean_c = b.cost_usd / b.n, c.cost_usd / c.n
    counts = Evidence(
        n_baseline=b.n,
        n_candidate=c.n,
        baseline=1000 * mean_b,
        candidate=1000 * mean_c,
        threshold=max_ratio,
    )
    if mean_b <= 0.0:
        costly = mean_c > 0.0
        return GateResult(
            gate=gate.metric,
            severity=gate.severity,
            label=_breach(gate) if costly else Label.PASS,
            reason="baseline cost nothing, candidate does" if costly else "neither role cost",
            evidence=counts,
        )
    ratio = mean_c / mean_b
    if mean_c <= 0.0:
        lo = hi = 0.0
    else:
        var_b = max(0.0, (b.cost_sq_usd - b.n * mean_b**2) / max(1, b.n - 1))
        var_c = max(0.0, (c.cost_sq_usd - c.n * mean_c**2) / max(1, c.n - 1))
        se = math.sqrt(var_b / (b.n * mean_b**2) + var_c / (c.n * mean_c**2))
        lo, hi = ratio * math.exp(-config.z * se), ratio * math.exp(config.z * se)
    costly = ratio > max_ratio and lo > 1.0
    reason = (
        f"cost per 1k requests ${1000 * mean_c:.4g} vs ${1000 * mean_b:.4g}: ratio {ratio:.3f} "
        f"(CI {lo:.3f}-{hi:.3f}), limit {max_ratio:g}"
    )
    return GateResult(
        gate=gate.metric,
        severity=gate.severity,
        label=_breach(gate) if costly else Label.PASS,
        reason=("candidate costlier: " if costly else "") + reason,
        evidence=counts.model_copy(update={"estimate": ratio, "ci_low": lo, "ci_high": hi}),
    )


def accuracy(gate: LiveGate, sample: WindowSample, config: JudgeConfig) -> GateResult:
    """Share of fact-checked answers that were correct, candidate - baseline, vs `margin`.

    Newcombe's interval (from Wilson intervals) at 1 - alpha. Breach when the difference is
    worse than -margin AND the interval's upper bound is below 0 (a real drop). Non-inferiority
    in the strict sense (lower bound above -margin) is reported in the evidence: with the
    few hundred checked answers of one window it is often not yet shown even for an equal
    candidate, and a soft gate that paused on every such window would teach people to ignore it.
    """
    margin = _threshold(gate, "margin")
    b, c = sample.baseline, sample.candidate
    missing = _nodata(gate, "fact-checked answers", b.facts, c.facts, config.min_samples)
    if missing is not None:
        return missing
    acc_b, acc_c = b.correct / b.facts, c.correct / c.facts
    diff = acc_c - acc_b
    lo, hi = newcombe_interval(c.correct, c.facts, b.correct, b.facts, 1.0 - config.alpha)
    worse = diff < -margin and hi < 0.0
    non_inferior = lo > -margin
    reason = (
        f"accuracy {acc_c:.3f} vs {acc_b:.3f}: difference {diff:+.3f} (CI {lo:+.3f} to "
        f"{hi:+.3f}), margin {margin:g}; "
        + ("non-inferior" if non_inferior else "non-inferiority not shown")
    )
    return GateResult(
        gate=gate.metric,
        severity=gate.severity,
        label=_breach(gate) if worse else Label.PASS,
        reason=("candidate less accurate: " if worse else "") + reason,
        evidence=Evidence(
            n_baseline=b.facts,
            n_candidate=c.facts,
            baseline=acc_b,
            candidate=acc_c,
            estimate=diff,
            ci_low=lo,
            ci_high=hi,
            threshold=-margin,
            detail={"non_inferior": "yes" if non_inferior else "no"},
        ),
    )
