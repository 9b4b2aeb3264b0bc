"""Statistics per metric: one window's baseline and candidate in, a GateResult with evidence out.

Pure functions: no I/O, no clock, a fixed bootstrap seed, so the same window always gets the
same verdict. Thresholds come from the gate, confidence from the policy's alpha (split across
its gates); nothing here is a literal a policy could want to change. Edge cases are labelled
first (too few samples -> NODATA); a breach of a hard gate is FAIL, of a soft gate REVIEW.

The per-window effect gates (cost, accuracy) share one rule: breach when the point estimate is
beyond the gate's tolerance AND the interval excludes "no change" (a real shift, not noise).
The rate gates (`rates`) and latency gates (`latency`) are sequential across windows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from canaryflow.analysis.samples import WindowSample
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
    newcombe_interval,
)

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
    """What every judge needs from the policy besides its own gate; `alpha` is one gate's."""

    alpha: float = 0.05
    min_samples: int = 30
    resamples: int = 2000
    seed: int = 20260112

    @classmethod
    def from_policy(cls, policy: GatePolicy) -> JudgeConfig:
        """One error budget per release: the policy's alpha split evenly across its live
        gates (Bonferroni). Each gate's sequential tests hold their share across every window
        they are carried through, so the release is wrongly stopped with probability at most
        `policy.alpha` by all of them together."""
        return cls(alpha=policy.alpha / max(1, len(policy.live)), min_samples=policy.min_samples)

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
    b, c = sample.baseline, sample.candidate
    return share_margin(
        gate, config, "fact-checked answers", (c.correct, c.facts), (b.correct, b.facts),
        lambda acc_c, acc_b: f"accuracy {acc_c:.3f} vs {acc_b:.3f}",
        "candidate less accurate: ",
    )  # fmt: skip


def share_margin(
    gate: LiveGate,
    config: JudgeConfig,
    what: str,
    candidate: tuple[int, int],
    baseline: tuple[int, int],
    headline: Callable[[float, float], str],
    worse_prefix: str,
    detail: Mapping[str, float | int | str] | None = None,
    says_non_inferiority: bool = True,
) -> GateResult:
    """A share passed (`(passed, n)` per role), candidate - baseline, against the gate's
    `margin`: Newcombe's interval at 1 - alpha; a breach when the difference is worse than
    -margin AND the interval lies below 0; NODATA under `min_samples` on either side. Evidence
    says whether non-inferiority (lower bound above -margin) is shown."""
    margin = _threshold(gate, "margin")
    (passed_c, n_c), (passed_b, n_b) = candidate, baseline
    missing = _nodata(gate, what, n_b, n_c, config.min_samples)
    if missing is not None:
        return missing
    share_b, share_c = passed_b / n_b, passed_c / n_c
    diff = share_c - share_b
    lo, hi = newcombe_interval(passed_c, n_c, passed_b, n_b, 1.0 - config.alpha)
    worse = diff < -margin and hi < 0.0
    non_inferior = lo > -margin
    reason = (
        f"{headline(share_c, share_b)}: difference {diff:+.3f} (CI {lo:+.3f} to {hi:+.3f}), "
        f"margin {margin:g}"
    )
    if says_non_inferiority:
        reason += "; " + ("non-inferior" if non_inferior else "non-inferiority not shown")
    return GateResult(
        gate=gate.metric,
        severity=gate.severity,
        label=_breach(gate) if worse else Label.PASS,
        reason=(worse_prefix if worse else "") + reason,
        evidence=Evidence(
            n_baseline=n_b,
            n_candidate=n_c,
            baseline=share_b,
            candidate=share_c,
            estimate=diff,
            ci_low=lo,
            ci_high=hi,
            threshold=-margin,
            detail={**(detail or {}), "non_inferior": "yes" if non_inferior else "no"},
        ),
    )
