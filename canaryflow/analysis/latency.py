"""Latency gates (whole answer, time to first token): sequential rank tests against stable.

Two anytime-valid tests per gate, each at half the gate's alpha, carried across windows (and
stages) in `LatencyState`, both against stable's values of the same windows scaled by
1 + `tolerance` (default 0.05: H0 is "candidate <= 1.05 x stable in distribution"):

- median: a Mann-Whitney z per window, combined over windows by a normal-mixture martingale
  (`stats.anytime.RankState`): a shift of the bulk;
- tail: how many of the candidate's values sit above the pooled p95 of both roles, against its
  share of the window's values (`stats.anytime.ShareState` at ratio 1): a slow tail at an
  unchanged median, which the rank test barely sees.

Either rejected -> breach (FAIL for a hard gate, REVIEW for a soft one). The bootstrap p95 ratio
with its interval (the seed's `max_ratio` rule), the Hodges-Lehmann shift, and p50/p95/p99 of
both roles are evidence a human reads; they do not decide. A fresh bootstrap at every look has
no memory and inflates false rollbacks with every window; the e-processes do not.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from canaryflow.analysis.judges import P95, JudgeConfig, _breach, _threshold
from canaryflow.analysis.samples import WindowSample
from canaryflow.contracts import Evidence, Frozen, GateResult, Label, LiveGate, LiveMetric
from canaryflow.stats.anytime import TAIL_QUANTILE, RankState, ShareState, upper_tail_counts
from canaryflow.stats.estimators import bootstrap_quantile, hodges_lehmann, nearest_rank

Floats = npt.NDArray[np.float64]
QUANTILES = {"p50": 0.5, "p95": 0.95, "p99": 0.99}


class LatencyState(Frozen):
    """One latency gate's running tests: the median's rank test and the upper tail's."""

    median: RankState
    tail: ShareState


def fitting(gate: LiveGate, config: JudgeConfig, state: LatencyState | None) -> LatencyState:
    """`state` if it was run at this gate's tolerance and alpha, else a fresh one."""
    tolerance, alpha = gate.latency_tolerance, config.alpha / 2.0
    if state is not None and state.median.tolerance == tolerance and state.median.alpha == alpha:
        return state
    return LatencyState(median=RankState.start(tolerance, alpha), tail=ShareState.start(1.0, alpha))


def values(gate: LiveGate, sample: WindowSample) -> tuple[Floats, Floats, str]:
    """(baseline, candidate, what) the gate compares: whole-answer latencies, or the time to
    first token of streamed answers. Unstreamed answers are left out of TTFT (they would dilute
    the shift); a window with no streamed answer at all is judged on latency, which is then
    the first token's."""
    b, c = sample.baseline, sample.candidate
    if gate.metric is LiveMetric.TTFT_P95:
        if len(b.ttfts_ms) or len(c.ttfts_ms):
            return b.ttfts, c.ttfts, "TTFT"
        return b.latencies, c.latencies, "no streamed answers; first token = whole answer:"
    return b.latencies, c.latencies, "latency"


def latency(
    gate: LiveGate,
    sample: WindowSample,
    config: JudgeConfig,
    state: LatencyState | None = None,
) -> tuple[GateResult, LatencyState]:
    """Candidate's latencies (or TTFTs) against stable's x (1 + tolerance), anytime-valid
    across windows (rule in the module docstring). Pass `state=None` for a first window."""
    max_ratio = _threshold(gate, "max_ratio")  # the p95 ratio reported as evidence
    baseline, candidate, what = values(gate, sample)
    if not (np.isfinite(baseline).all() and np.isfinite(candidate).all()):
        raise ValueError(f"{what} values must be finite numbers of milliseconds")
    state = fitting(gate, config, state)
    tolerance = state.median.tolerance
    scaled = (1.0 + tolerance) * baseline
    kc, kb = upper_tail_counts(candidate, scaled)
    state = LatencyState(
        median=state.median.update(candidate, baseline),
        tail=state.tail.update(kc, len(candidate), kb, len(baseline)),
    )
    base, cand = np.sort(baseline), np.sort(candidate)
    detail = _evidence_detail(base, cand, state, kc, kb, config, max_ratio)
    median, tail = state.median, state.tail
    n_b, n_c = median.n_baseline, median.n_candidate
    stable = f"{1 + tolerance:g} x stable" if tolerance else "stable"
    figures = _figures(what, detail, max_ratio)
    tests = (
        f"median e-value {median.e_value:.3g}, tail e-value {tail.e_value:.3g} "
        f"(each rejects at {1 / median.alpha:.3g})"
    )
    if median.rejected:
        label = _breach(gate)
        reason = (
            f"candidate slower than {stable}: {figures}; rank test over {median.looks} "
            f"window(s) crossed in window {median.rejected_at}; {tests}"
        )
    elif tail.rejected:
        label = _breach(gate)
        reason = (
            f"candidate's tail slower than {stable}: {tail.events_candidate} of "
            f"{tail.trials_candidate} candidate vs {tail.events_baseline} of "
            f"{tail.trials_baseline} stable above the pooled p{TAIL_QUANTILE * 100:.0f}, "
            f"crossed in window {tail.rejected_at}; {figures}; {tests}"
        )
    elif min(n_b, n_c) < config.min_samples:
        label = Label.NODATA
        reason = (
            f"too few {what} values: baseline {len(base)}, candidate {len(cand)} in this window "
            f"({n_b} and {n_c} over the windows so far); each role needs at least "
            f"{config.min_samples}"
        )
    else:
        label = Label.PASS
        reason = f"not shown slower than {stable}: {figures}; {tests}"
    p95_b, p95_c = detail.get("p95_baseline_ms"), detail.get("p95_candidate_ms")
    ratio = detail.get("p95_ratio")
    evidence = Evidence(
        n_baseline=len(base),
        n_candidate=len(cand),
        baseline=float(p95_b) if p95_b is not None else None,
        candidate=float(p95_c) if p95_c is not None else None,
        estimate=float(ratio) if ratio is not None else None,
        ci_low=_float(detail.get("p95_ratio_ci_low")),
        ci_high=_float(detail.get("p95_ratio_ci_high")),
        p_value=min(median.p_value, tail.p_value),
        threshold=1.0 + tolerance,
        detail=detail,
    )
    result = GateResult(
        gate=gate.metric, severity=gate.severity, label=label, reason=reason, evidence=evidence
    )
    return result, state


def _float(value: float | int | str | None) -> float | None:
    return None if value is None else float(value)


def _figures(what: str, detail: dict[str, float | int | str], max_ratio: float) -> str:
    """'latency p50 41.0 vs 40.1 ms, p95 ..., p99 ...; p95 ratio 1.02 (CI 0.97-1.08, limit
    1.2)' from what the window has."""
    parts = [
        f"{name} {float(detail[f'{name}_candidate_ms']):.1f} vs "
        f"{float(detail[f'{name}_baseline_ms']):.1f} ms"
        for name in QUANTILES
        if f"{name}_candidate_ms" in detail and f"{name}_baseline_ms" in detail
    ]
    text = f"{what} " + ", ".join(parts) if parts else f"{what}: no values in this window"
    if "p95_ratio" in detail:
        text += (
            f"; p95 ratio {float(detail['p95_ratio']):.3f} (CI "
            f"{float(detail['p95_ratio_ci_low']):.3f}-{float(detail['p95_ratio_ci_high']):.3f}, "
            f"seed limit {max_ratio:g}, evidence)"
        )
    return text


def _evidence_detail(
    base: Floats,
    cand: Floats,
    state: LatencyState,
    kc: int,
    kb: int,
    config: JudgeConfig,
    max_ratio: float,
) -> dict[str, float | int | str]:
    """p50/p95/p99 per role, the tests' running figures, and where both roles have
    `min_samples` values: the bootstrap p95 ratio with its interval, Mann-Whitney's p and the
    Hodges-Lehmann shift of this window."""
    from scipy.stats import mannwhitneyu

    median, tail = state.median, state.tail
    detail: dict[str, float | int | str] = {
        "tolerance": median.tolerance,
        "median_e_value": median.e_value,
        "tail_e_value": tail.e_value,
        "reject_at_e": 1.0 / median.alpha,
        "rank_windows": median.looks,
        "rank_z_sum": median.z_sum,
        "tail_candidate": kc,
        "tail_baseline": kb,
        "cumulative_tail_candidate": tail.events_candidate,
        "cumulative_tail_baseline": tail.events_baseline,
        "cumulative_n_candidate": tail.trials_candidate,
        "cumulative_n_baseline": tail.trials_baseline,
        "p95_limit": max_ratio,
    }
    if median.last_z is not None:
        detail["rank_z_window"] = median.last_z
    for role, values in (("baseline", base), ("candidate", cand)):
        if len(values):
            for name, q in QUANTILES.items():
                detail[f"{name}_{role}_ms"] = nearest_rank(values, q)
    if min(len(base), len(cand)) < config.min_samples:
        return detail
    p95_b, p95_c = nearest_rank(base, P95), nearest_rank(cand, P95)
    if p95_b > 0.0:
        rng = np.random.default_rng(config.seed)
        boot_b = bootstrap_quantile(base, P95, config.resamples, rng)
        boot_c = bootstrap_quantile(cand, P95, config.resamples, rng)
        ratios = boot_c / np.maximum(boot_b, np.finfo(np.float64).tiny)
        lo, hi = np.quantile(ratios, [config.alpha / 2.0, 1.0 - config.alpha / 2.0])
        detail.update(
            {
                "p95_ratio": p95_c / p95_b,
                "p95_ratio_ci_low": float(lo),
                "p95_ratio_ci_high": float(hi),
            }
        )
    shift, shift_lo, shift_hi = hodges_lehmann(base, cand, config.z)
    detail.update(
        {
            "mann_whitney_p": float(mannwhitneyu(cand, base, alternative="greater").pvalue),
            "hl_shift_ms": shift,
            "hl_ci_low_ms": shift_lo,
            "hl_ci_high_ms": shift_hi,
        }
    )
    return detail
