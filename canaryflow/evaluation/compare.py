"""Paired comparison of candidate and baseline on one suite, and the offline gate's decision.

The gate asks for non-inferiority, not equality: a candidate may be a little worse (up to the
suite's margin) as long as the interval shows it is not worse than that. With d = (c - b) / n and
its Tango interval [lo, hi] at 1 - alpha:

- PASS when lo >= -margin: non-inferiority shown;
- FAIL when hi < -margin (shown worse by more than the margin), or when the exact McNemar test
  says worse (two-sided p < alpha with b > c, i.e. one-sided at alpha/2) and d < -margin;
- REVIEW otherwise: the interval straddles -margin and the candidate is not shown worse.

Why McNemar and the estimate rather than the interval's upper end alone: a drop of `delta` then
fails with 80% power once delta > max(margin, z * sd) + 0.84 * sd, not margin + 2.8 * sd, which
halves the items a suite needs for the same detectable drop. Testing at alpha/2 per side keeps
the FAIL of an equal-quality candidate at most alpha/2 at any n, and agrees with the interval
shown (a FAIL's interval excludes 0 up to the exact test's discreteness). Every report states
n, the margin and the drop it detects with 80% power (`detectable_drop`).
"""

from __future__ import annotations

from collections.abc import Sequence

from canaryflow.contracts import (
    Decision,
    Evidence,
    GateResult,
    Label,
    OfflineGate,
    Severity,
    SuiteComparison,
    combine,
)
from canaryflow.stats.proportions import (
    DISCORDANCE_FLOOR,
    assumed_discordance,
    detectable_drop,
    items_to_show_non_inferiority,
    mcnemar_exact,
    paired_difference_ci,
    wilson_interval,
)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def _p(p: float) -> str:
    return "p<0.0001" if p < 0.0001 else f"p={p:.4f}"


POWER = 0.8  # the power at which every suite report states its detectable drop


def _power_note(n: int, margin: float, mde: float, assumed: float, observed: float) -> str:
    """What a reader needs to judge a suite's verdict: how big a drop it could have caught."""
    return (
        f"n={n}, {100 * margin:g}-pt margin, {100 * POWER:g}% power against a drop of "
        f"{100 * mde:.1f} pts ({_pct(assumed)} discordance assumed, {_pct(observed)} observed)"
    )


def compare_suite(
    suite_name: str, pairs: Sequence[tuple[bool, bool]], gate: OfflineGate, unscored: int = 0
) -> SuiteComparison:
    """`pairs` holds one (baseline_passed, candidate_passed) per item, in either order of items;
    `unscored` counts the items left out because their scorer could not tell (said in the
    reason: they are missing evidence, not passes)."""
    n = len(pairs)
    confidence = 1 - gate.alpha
    margin = gate.margin_for(suite_name)
    baseline_pass = sum(1 for base, _ in pairs if base)
    candidate_pass = sum(1 for _, cand in pairs if cand)
    b = sum(1 for base, cand in pairs if base and not cand)
    c = sum(1 for base, cand in pairs if cand and not base)
    p = mcnemar_exact(b, c)
    base_rate = baseline_pass / n if n else 0.0
    cand_rate = candidate_pass / n if n else 0.0
    diff = (c - b) / n if n else 0.0
    diff_ci = paired_difference_ci(b, c, n, confidence) if n else (-1.0, 1.0)

    label, verdict = _judge(n, b, c, diff, diff_ci, p, margin, gate)
    observed = (b + c) / n if n else 0.0
    assumed = assumed_discordance(b, c, n)
    mde = detectable_drop(max(n, 1), margin, gate.alpha, assumed, POWER)
    summary = (
        f"{suite_name}: candidate {_pct(cand_rate)} vs baseline {_pct(base_rate)} "
        f"(diff {_pts(diff)} pts, {100 * confidence:g}% CI [{_pts(diff_ci[0])}, "
        f"{_pts(diff_ci[1])}]), McNemar {_p(p)}: {verdict}; "
        f"{_power_note(n, margin, mde, assumed, observed)}"
    )
    if unscored:
        summary += f" ({unscored} unscored item(s) left out)"
    result = GateResult(
        gate=f"offline.{suite_name}",
        severity=Severity.HARD,
        label=label,
        reason=summary,
        evidence=Evidence(
            n_baseline=n,
            n_candidate=n,
            baseline=base_rate,
            candidate=cand_rate,
            estimate=diff,
            ci_low=diff_ci[0],
            ci_high=diff_ci[1],
            p_value=p,
            threshold=-margin,
            detail={
                "only_baseline": b,
                "only_candidate": c,
                "confidence": confidence,
                "n": n,
                "margin": margin,
                "alpha": gate.alpha,
                "power": POWER,
                "detectable_drop": mde,
                "discordance_observed": observed,
                "discordance_assumed": assumed,
                "discordance_floor": DISCORDANCE_FLOOR,
            }
            | ({"unscored": unscored} if unscored else {}),
        ),
    )
    return SuiteComparison(
        suite=suite_name,
        n=n,
        baseline_pass=baseline_pass,
        candidate_pass=candidate_pass,
        baseline_rate=base_rate,
        candidate_rate=cand_rate,
        baseline_ci=wilson_interval(baseline_pass, n, confidence),
        candidate_ci=wilson_interval(candidate_pass, n, confidence),
        only_baseline=b,
        only_candidate=c,
        mcnemar_p=p,
        diff=diff,
        diff_ci=diff_ci,
        margin=margin,
        result=result,
    )


def _judge(
    n: int,
    b: int,
    c: int,
    diff: float,
    diff_ci: tuple[float, float],
    p: float,
    margin: float,
    gate: OfflineGate,
) -> tuple[Label, str]:
    margin_text = f"{100 * margin:g}-pt margin"
    if n < gate.min_items:
        return Label.NODATA, (
            f"only {n} paired items, the gate needs at least {gate.min_items}: "
            "evaluate more items (or lower min_items in the policy)"
        )
    if diff_ci[0] >= -margin:
        return Label.PASS, f"non-inferior within the {margin_text}"
    if diff_ci[1] < -margin:
        return Label.FAIL, f"regression beyond the {margin_text}: the whole interval is below it"
    if diff < -margin and b > c and p < gate.alpha:
        return Label.FAIL, (
            f"regression beyond the {margin_text}: significantly worse (McNemar p < "
            f"{gate.alpha:g}) with the estimate past the margin"
        )
    needed = items_to_show_non_inferiority(margin, 1 - gate.alpha)
    if needed is None or n < needed:
        more = "a margin of 0" if needed is None else f"{n} items (it takes {needed})"
        return Label.REVIEW, (
            f"inconclusive: the interval reaches below the {margin_text}, and with {more} "
            "even identical answers could not show non-inferiority: review the failed items, "
            "or evaluate more items"
        )
    return Label.REVIEW, (
        f"inconclusive: the interval straddles the {margin_text} and the candidate is not "
        "shown worse; review the failed items or evaluate more of them"
    )


def decide(comparisons: Sequence[SuiteComparison]) -> Decision:
    """No suite compared is no evidence, never a pass."""
    if not comparisons:
        return Decision.INCONCLUSIVE
    return combine([c.result for c in comparisons])
