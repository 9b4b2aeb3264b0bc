"""The `satisfaction` gate: users' ratings of the candidate's answers against stable's.

Pure, like every judge: ratings in (on 0 = worst .. 1 = best, as the model service stores them,
whatever scale users rate on), a GateResult with evidence out. Judged only when a policy names
it (never a default gate): a service whose users never rate would otherwise get NODATA in every
window. Even named, it can only judge canary windows, since users never see a shadow's answers;
in a shadow window it reports NODATA as soft, so it holds no shadow stage. Declare it `soft`
unless users rate enough answers for `min_samples` ratings per role per window: a hard gate
with too few ratings makes every window inconclusive, which ends the release.

Ratings arrive after their answers, and a window is judged soon after it ends, so the last
answers of a window often have no rating yet; both roles lose the same share, so the comparison
stays fair, only smaller.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from canaryflow.analysis.judges import JudgeConfig, _breach, _nodata, _threshold
from canaryflow.analysis.samples import WindowSample
from canaryflow.contracts import Evidence, GateResult, Label, LiveGate, Role, Severity
from canaryflow.stats.estimators import newcombe_interval


@dataclass(frozen=True)
class MeanDifference:
    """Candidate mean - baseline mean with Welch's interval at 1 - alpha."""

    mean_baseline: float
    mean_candidate: float
    diff: float
    ci_low: float
    ci_high: float
    p_lower: float  # one-sided: the candidate's mean is below the baseline's
    df: float


def mean_difference(
    candidate: Sequence[float], baseline: Sequence[float], alpha: float
) -> MeanDifference:
    """Welch's t interval for the difference of two means (each side at least 2 values).

    Ratings are bounded and few distinct values, but their means are close to normal from a
    few dozen on; the unequal-variance form because a candidate can split opinions where
    stable did not. Two constant sides (everyone rated the same) give a zero-width interval.
    """
    from scipy.stats import t

    nc, nb = len(candidate), len(baseline)
    if nc < 2 or nb < 2:
        raise ValueError(f"need at least 2 ratings per side, got candidate {nc}, baseline {nb}")
    mc, mb = math.fsum(candidate) / nc, math.fsum(baseline) / nb
    vc = math.fsum((x - mc) ** 2 for x in candidate) / (nc - 1)
    vb = math.fsum((x - mb) ** 2 for x in baseline) / (nb - 1)
    diff = mc - mb
    sc, sb = vc / nc, vb / nb
    se = math.sqrt(sc + sb)
    if se == 0.0:
        p_lower = 0.0 if diff < 0 else 1.0
        return MeanDifference(mb, mc, diff, diff, diff, p_lower, float(nc + nb - 2))
    df = (sc + sb) ** 2 / (sc**2 / (nc - 1) + sb**2 / (nb - 1))
    half = float(t.ppf(1.0 - alpha / 2.0, df)) * se
    p_lower = float(t.cdf(diff / se, df))
    return MeanDifference(mb, mc, diff, diff - half, diff + half, p_lower, df)


def satisfaction(gate: LiveGate, sample: WindowSample, config: JudgeConfig) -> GateResult:
    """Mean rating, candidate - baseline, vs the gate's `margin` (on the 0..1 scale).

    Breach (FAIL for a hard gate, REVIEW for a soft one) when the difference is worse than
    -margin AND Welch's interval lies below 0: rated lower by more than the tolerance, and not
    by chance. Fewer than `min_samples` ratings on either side is NODATA, never a pass. The
    share of negative ratings of each role and Newcombe's interval for their difference are
    evidence a human reads; they do not decide.
    """
    margin = _threshold(gate, "margin")
    b, c = sample.baseline, sample.candidate
    nb, nc = len(b.ratings), len(c.ratings)
    if sample.candidate_role == Role.SHADOW.value:
        return GateResult(
            gate=gate.metric,
            severity=Severity.SOFT,
            label=Label.NODATA,
            reason="users never see a shadow's answers, so none are rated: satisfaction is "
            "judged in canary windows only",
            evidence=Evidence(n_baseline=nb, n_candidate=nc, threshold=-margin),
        )
    missing = _nodata(gate, "ratings", nb, nc, config.min_samples)
    if missing is not None:
        return missing.model_copy(
            update={
                "reason": missing.reason + " (users' ratings via POST /v1/feedback: lengthen the "
                "window, raise the canary share, or make this gate soft)"
            }
        )
    found = mean_difference(c.ratings, b.ratings, config.alpha)
    worse = found.diff < -margin and found.ci_high < 0.0
    neg_b, neg_c = b.negative_ratings / nb, c.negative_ratings / nc
    neg_lo, neg_hi = newcombe_interval(
        c.negative_ratings, nc, b.negative_ratings, nb, 1.0 - config.alpha
    )
    reason = (
        f"mean rating {found.mean_candidate:.3f} vs {found.mean_baseline:.3f} (0..1): "
        f"difference {found.diff:+.3f} (CI {found.ci_low:+.3f} to {found.ci_high:+.3f}), "
        f"margin {margin:g}; negative {neg_c:.1%} vs {neg_b:.1%} of {nc} and {nb} ratings"
    )
    return GateResult(
        gate=gate.metric,
        severity=gate.severity,
        label=_breach(gate) if worse else Label.PASS,
        reason=("users rate the candidate lower: " if worse else "") + reason,
        evidence=Evidence(
            n_baseline=nb,
            n_candidate=nc,
            baseline=found.mean_baseline,
            candidate=found.mean_candidate,
            estimate=found.diff,
            ci_low=found.ci_low,
            ci_high=found.ci_high,
            p_value=found.p_lower,
            threshold=-margin,
            detail={
                "welch_df": found.df,
                "negative_baseline": b.negative_ratings,
                "negative_candidate": c.negative_ratings,
                "negative_share_baseline": neg_b,
                "negative_share_candidate": neg_c,
                "negative_share_diff_ci_low": neg_lo,
                "negative_share_diff_ci_high": neg_hi,
            },
        ),
    )
