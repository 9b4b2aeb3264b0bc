"""Paired comparison of candidate and baseline on one suite, and the offline gate's decision.

The gate asks for non-inferiority, not equality: a candidate may be a little worse (up to the
suite's margin) as long as the interval shows it is not worse than that.
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

    label, verdict = _judge(n, diff, diff_ci, p, margin, gate)
    summary = (
        f"{suite_name}: candidate {_pct(cand_rate)} vs baseline {_pct(base_rate)} "
        f"(diff {_pts(diff)} pts, {100 * confidence:g}% CI [{_pts(diff_ci[0])}, "
        f"{_pts(diff_ci[1])}]), McNemar {_p(p)}: {verdict}"
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
            detail={"only_baseline": b, "only_candidate": c, "confidence": confidence}
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
    if diff < -margin:
        return Label.FAIL, f"regression beyond the {margin_text}"
    if p < gate.alpha and diff < 0:
        return Label.FAIL, (
            f"significant regression (p < {gate.alpha:g}) that may exceed the {margin_text}"
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
        f"inconclusive: the interval reaches below the {margin_text}; "
        "review the failed items or evaluate more of them"
    )


def decide(comparisons: Sequence[SuiteComparison]) -> Decision:
    """No suite compared is no evidence, never a pass."""
    if not comparisons:
        return Decision.INCONCLUSIVE
    return combine([c.result for c in comparisons])
