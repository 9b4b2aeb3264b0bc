"""Policy floors: what a release spec may not go below, whoever delivered it.

A CI delivery chooses its plan and policy; the worker holds a floor per service (`Settings`
reads it from the floors file, never from flow parameters). `below_floor` lists every field of a
spec that is looser than its floor, each with the floor it breaks, so a refusal says what to fix.
"""

from __future__ import annotations

from canaryflow.contracts import LiveGate, PolicyFloor, ReleaseSpec, Severity

# What a window costs beyond its own length before its event restarts the silence clock: the
# watermark wait (at most `runbook.WATERMARK_WAIT_S`, 10 s), then reading, judging, the evidence
# and the next step's route write (20 s).
JUDGING_SLACK_S = 30.0


def _looser(gate: LiveGate, floor: LiveGate) -> bool:
    """True when `gate` lets through more than `floor` would (or is only a soft gate)."""
    if gate.severity is not Severity.HARD:
        return True
    pairs = [(gate.max_ratio, floor.max_ratio), (gate.max_rate, floor.max_rate)]
    pairs.append((gate.margin, floor.margin))
    # Absent, these take their defaults (never off): compare what the gate will use.
    if floor.relative_ratio is not None and gate.max_rate is not None:
        pairs.append((gate.rate_ratio, floor.relative_ratio))
    if floor.tolerance is not None:
        pairs.append((gate.latency_tolerance, floor.tolerance))
    return any(value is None or value > limit for value, limit in pairs if limit is not None)


def _limits(floor: LiveGate) -> str:
    limit = floor.max_ratio or floor.max_rate or floor.margin
    text = f"at most {limit:g}"
    if floor.relative_ratio is not None:
        text += f", relative_ratio at most {floor.relative_ratio:g}"
    if floor.tolerance is not None:
        text += f", tolerance at most {floor.tolerance:g}"
    return text


def below_floor(spec: ReleaseSpec, floor: PolicyFloor) -> list[str]:
    """Every way `spec` is looser than `floor`; empty when it may run."""
    policy, problems = spec.policy, []
    for required in floor.required_gates:
        gates = [g for g in policy.live if g.metric is required.metric]
        if not gates or all(_looser(g, required) for g in gates):
            problems.append(
                f"policy.live needs a hard {required.metric} gate {_limits(required)} (the floor)"
            )
    if policy.min_samples < floor.min_samples:
        problems.append(f"policy.min_samples must be at least {floor.min_samples}")
    if policy.alpha < floor.min_alpha:
        problems.append(f"policy.alpha must be at least {floor.min_alpha:g}")
    if policy.offline.alpha < floor.min_alpha:
        problems.append(f"policy.offline.alpha must be at least {floor.min_alpha:g}")
    margins = [policy.offline.non_inferiority_margin, *policy.offline.margins.values()]
    if max(margins) > floor.max_offline_margin:
        problems.append(f"policy.offline margins must be at most {floor.max_offline_margin:g}")
    if policy.offline.min_items < floor.min_offline_items:
        problems.append(f"policy.offline.min_items must be at least {floor.min_offline_items}")
    if len(spec.canary.steps) < floor.min_canary_steps:
        problems.append(f"canary.steps needs at least {floor.min_canary_steps} step(s)")
    if floor.require_shadow and not spec.shadow.enabled:
        problems.append("shadow.enabled must be true for this service")
    if spec.allow_incompatible and not floor.allow_incompatible:
        problems.append("allow_incompatible is not allowed for this service")
    if spec.approval.default_action == "approve" and not floor.allow_default_approve:
        problems.append("approval.default_action must be 'reject' for this service")
    return problems


def late_records_wait_s(spec_late_s: float, request_timeout_s: float) -> float:
    """How long after the last window the late look waits: the data plane's provider timeout
    (a request unfinished by then is recorded as an error), which a spec may lengthen, never
    shorten: a delivery cannot skip the look."""
    return max(spec_late_s, request_timeout_s)


def beyond_silence(
    spec: ReleaseSpec,
    within_s: float,
    slack_s: float = JUDGING_SLACK_S,
    request_timeout_s: float = 0.0,
) -> list[str]:
    """Every look of `spec` that would outlast the silence automation's `within` (its trigger in
    prefect.yaml): a window, plus `slack_s` of judging, must end before the automation takes
    the silence for a dead release and rolls the service back. Empty when it fits."""
    limit = within_s - slack_s
    looks = [(f"canary.steps[{i}].window_s", s.window_s) for i, s in enumerate(spec.canary.steps)]
    looks.append(
        (
            "canary.late_records_s",
            late_records_wait_s(spec.canary.late_records_s, request_timeout_s),
        )
    )
    if spec.shadow.enabled:
        looks.insert(0, ("shadow.window_s", spec.shadow.window_s))
    return [
        f"{field} is {value:g} s; with {slack_s:g} s of judging it must stay below the silence "
        f"automation's within ({within_s:g} s, prefect.yaml trigger canaryflow-silent-canary): "
        f"at most {max(limit, 0.0):g} s, or raise the trigger's within"
        for field, value in looks
        if value >= limit
    ]
