"""Rate gates (errors, hallucinations, unsafe answers): the seed's ceiling and stable, together.

Two anytime-valid tests per gate, carried across windows (and stages) in `RateStates`:

- relative: is the candidate's rate above `relative_ratio` (default 1.0) x stable's, in the
  same windows, given each role's observed trials (`stats.anytime.ShareState`);
- ceiling: is the candidate's rate above `max_rate` (`stats.sequential.SequentialState`), with
  stable's own counts run through the same test for context.

Rule, with the gate's alpha split 3/4 to the relative test and 1/4 to the ceiling (a union of
the two claims stays within the gate's share of the release's alpha):

    relative rejected                        breach (FAIL for a hard gate, REVIEW for a soft one)
    ceiling rejected, stable above it too    REVIEW: stable sits above the ceiling as well and
                                             the candidate is not shown worse than stable
    ceiling rejected, stable below it        breach
    otherwise                                PASS, or NODATA below `min_samples` trials so far

"Stable above it too" means stable's own ceiling test rejected, or stable's observed rate over
the same windows is above the ceiling: with equal splits (a shadow) the two ceiling tests race,
and which crosses first is chance. It only ever turns a FAIL into a question for a human; a
candidate worse than stable is still failed by the relative test. A better candidate only lowers
the relative e-process, so it never breaches through it.
"""

from __future__ import annotations

from canaryflow.analysis.judges import (
    QUALITY_RATES,
    RATE_FIELDS,
    JudgeConfig,
    _breach,
    _threshold,
)
from canaryflow.analysis.samples import RoleSample, WindowSample
from canaryflow.contracts import Evidence, Frozen, GateResult, Label, LiveGate, LiveMetric
from canaryflow.stats.anytime import ShareState
from canaryflow.stats.sequential import SequentialState

RELATIVE_SHARE = 0.75  # of the gate's alpha; the ceiling gets the rest


class RateStates(Frozen):
    """One rate gate's running tests: the candidate's and stable's ceiling tests, the relative."""

    candidate: SequentialState
    baseline: SequentialState
    relative: ShareState


def start_states(gate: LiveGate, config: JudgeConfig) -> RateStates:
    bound, alpha = _threshold(gate, "max_rate"), config.alpha
    ceiling = SequentialState.start(bound, (1.0 - RELATIVE_SHARE) * alpha)
    return RateStates(
        candidate=ceiling,
        baseline=ceiling,
        relative=ShareState.start(gate.rate_ratio, RELATIVE_SHARE * alpha),
    )


def fitting(gate: LiveGate, config: JudgeConfig, states: RateStates | None) -> RateStates:
    """`states` where each test was run for this gate's bound, ratio and alpha; a fresh test
    for any that was not (evidence against another bound says nothing about this one)."""
    fresh = start_states(gate, config)
    if states is None:
        return fresh

    def same_ceiling(state: SequentialState) -> bool:
        return state.bound == fresh.candidate.bound and state.alpha == fresh.candidate.alpha

    relative = states.relative
    same_relative = (
        relative.ratio == fresh.relative.ratio and relative.alpha == fresh.relative.alpha
    )
    return RateStates(
        candidate=states.candidate if same_ceiling(states.candidate) else fresh.candidate,
        baseline=states.baseline if same_ceiling(states.baseline) else fresh.baseline,
        relative=relative if same_relative else fresh.relative,
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
    states: RateStates | None = None,
) -> tuple[GateResult, RateStates]:
    """Candidate's rate against stable's and against `max_rate`, anytime-valid across windows
    (rule in the module docstring). Pass `states=None` for a first window.

    The window's exact one-sided binomial p-value, its Clopper-Pearson interval and Fisher's
    exact test against the baseline are evidence, with both tests' e-values, the exposure pi
    the relative test used, and each role's cumulative counts.
    """
    from scipy.stats import binomtest, fisher_exact

    bound = _threshold(gate, "max_rate")
    ec, nc = rate_counts(gate.metric, sample.candidate)
    eb, nb = rate_counts(gate.metric, sample.baseline)
    states = fitting(gate, config, states)
    states = RateStates(
        candidate=states.candidate.update(ec, nc),
        baseline=states.baseline.update(eb, nb),
        relative=states.relative.update(ec, nc, eb, nb),
    )
    cand, rel = states.candidate, states.relative
    detail = _detail(states, eb, ec, nb, nc)
    if gate.metric in QUALITY_RATES:
        detail.update(checker_detail(sample.candidate))
    lo = hi = None
    if nc > 0:
        if 0 < bound < 1:
            detail["window_binomial_p"] = float(
                binomtest(ec, nc, bound, alternative="greater").pvalue
            )
        ci = binomtest(ec, nc).proportion_ci(1.0 - config.alpha, method="exact")
        lo, hi = float(ci.low), float(ci.high)
    if nc > 0 and nb > 0:
        table = [[ec, nc - ec], [eb, nb - eb]]
        detail["fisher_p_vs_baseline"] = float(fisher_exact(table, alternative="greater").pvalue)
    label, reason = _decide(gate, config, states, bound)
    quality = label is Label.NODATA and gate.metric in QUALITY_RATES
    if quality and (failing := checker_failures(sample.candidate)):
        reason += f"; the checkers failed: {failing}"
    evidence = Evidence(
        n_baseline=nb,
        n_candidate=nc,
        baseline=eb / nb if nb else None,
        candidate=ec / nc if nc else None,
        estimate=ec / nc if nc else None,
        ci_low=lo,
        ci_high=hi,
        p_value=min(rel.p_value, cand.p_value),
        threshold=bound,
        detail=detail,
    )
    result = GateResult(
        gate=gate.metric, severity=gate.severity, label=label, reason=reason, evidence=evidence
    )
    return result, states


def _rate(events: int, trials: int) -> str:
    return f"{events}/{trials}" + (f" ({events / trials:.3%})" if trials else "")


def _decide(
    gate: LiveGate, config: JudgeConfig, states: RateStates, bound: float
) -> tuple[Label, str]:
    cand, base, rel = states.candidate, states.baseline, states.relative
    counts = (
        f"candidate {_rate(cand.events, cand.trials)} vs stable {_rate(base.events, base.trials)} "
        f"over {cand.windows} window(s)"
    )
    relative = f"relative e-value {rel.e_value:.3g} (rejects at {1 / rel.alpha:.3g})"
    ceiling = f"ceiling e-value {cand.e_value:.3g} (rejects at {1 / cand.alpha:.3g})"
    ratio = f"{gate.rate_ratio:g} x " if gate.rate_ratio != 1.0 else ""
    stable_above = base.rejected or (base.trials > 0 and base.events / base.trials > bound)
    if rel.rejected:
        return _breach(gate), (
            f"candidate worse than {ratio}stable: {counts}; {relative} crossed in window "
            f"{rel.rejected_at}"
        )
    if cand.rejected and stable_above:
        return Label.REVIEW, (
            f"rate above {bound:g}, but stable is above the ceiling too; the candidate is not "
            f"shown worse than stable: {counts}; {ceiling}, stable's "
            f"{base.e_value:.3g}; {relative}"
        )
    if cand.rejected:
        return _breach(gate), (
            f"rate above {bound:g}: {counts}; {ceiling} crossed in window {cand.rejected_at}"
        )
    if cand.trials < config.min_samples:
        # The e-processes accumulate evidence across windows, so the floor is cumulative too.
        reason = (
            f"too few trials: {_rate(cand.events, cand.trials)} over {cand.windows} window(s); "
            f"need at least {config.min_samples}"
        )
        return Label.NODATA, reason
    return Label.PASS, (
        f"not shown above {bound:g} nor worse than {ratio}stable: {counts}; {ceiling}; {relative}"
    )


def _detail(states: RateStates, eb: int, ec: int, nb: int, nc: int) -> dict[str, float | int | str]:
    cand, base, rel = states.candidate, states.baseline, states.relative
    detail: dict[str, float | int | str] = {
        "e_value": cand.e_value,
        "reject_at_e": 1.0 / cand.alpha,
        "stable_e_value": base.e_value,
        "relative_e_value": rel.e_value,
        "relative_reject_at_e": 1.0 / rel.alpha,
        "relative_ratio": rel.ratio,
        "windows": cand.windows,
        "cumulative_events": cand.events,
        "cumulative_trials": cand.trials,
        "cumulative_events_baseline": base.events,
        "cumulative_trials_baseline": base.trials,
        "events_baseline": eb,
        "events_candidate": ec,
    }
    if nc > 0 and nb > 0:
        detail["pi_window"] = rel.ratio * nc / (rel.ratio * nc + nb)
    if (pi := rel.share_bound) is not None:
        detail["pi_cumulative"] = pi
    return detail


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
