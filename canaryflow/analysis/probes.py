"""The `probe_accuracy` gate: the candidate's share of labelled probes passed against stable's.

Probes (`canaryflow.local.probes` sends them, the model service scores them when it stores
them) ask stable and the candidate's role the same suite items at a small fixed rate, through
Envoy's synthetic listener, so no user gate counts them. At 0.2 probes per second a window of a
minute has a dozen per role, too few for `min_samples`: the sample therefore pools a role's
probes since the stage began, taken as the candidate's first scored probe in its role (shadow
or canary; every canary step shares one pool, the candidate's answers do not depend on its
weight), and stable's from that moment (or the window's start if earlier). Early windows are
NODATA; once both roles have `min_samples` scored probes, each window judges all of them. The
pool looks back at most `POOL_S`, which bounds the store read (a release of the same version
retried within it pools the earlier attempt's probes too).

Judged only when a policy names it (never a default gate), and a policy naming it needs a
`probes` checker (`GatePolicy` refuses it otherwise): a service without probes is never blocked.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Protocol

from canaryflow.analysis.judges import JudgeConfig, share_margin
from canaryflow.analysis.samples import WindowSample
from canaryflow.contracts import GateResult, LiveGate, Role

POOL_S = 6 * 3600.0  # the longest stage whose probes are pooled


class ProbeCounts(Protocol):
    """The store's `probe_counts` (`canaryflow.dataplane.store.Store`)."""

    def __call__(
        self, service: str, role: Role, version: str, since: float, until: float
    ) -> tuple[int, int, float | None]: ...


def _epoch(moment: datetime) -> float:
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def pooled_probes(
    store: object,
    service: str,
    baseline_version: str,
    candidate_version: str,
    role: Role,
    start: datetime,
    end: datetime,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(baseline, candidate) `RoleSample` fields for the probes up to `end`, pooled since the
    stage began (see the module docstring); none when the store keeps no probes."""
    counts: ProbeCounts | None = getattr(store, "probe_counts", None)
    if counts is None:
        return {}, {}
    until = _epoch(end)
    since = min(_epoch(start), until - POOL_S)
    n_c, passed_c, first = counts(service, role, candidate_version, since, until)
    pool_from = _epoch(start) if first is None else min(first, _epoch(start))
    n_b, passed_b, _ = counts(service, Role.STABLE, baseline_version, pool_from, until)
    return (
        {"probes": n_b, "probes_passed": passed_b},
        {"probes": n_c, "probes_passed": passed_c},
    )


def probe_accuracy(gate: LiveGate, sample: WindowSample, config: JudgeConfig) -> GateResult:
    """Share of probes passed, candidate - baseline, vs the gate's `margin`.

    As the `accuracy` gate: Newcombe's interval at 1 - alpha; a breach (FAIL for a hard gate,
    REVIEW for a soft one) when the difference is worse than -margin AND the interval lies
    below 0. Fewer than `min_samples` scored probes on either side is NODATA, never a pass.
    The probes are pooled over the stage (module docstring), so one candidate's probes are seen
    again in each later window: read the interval as the stage's, not the window's.
    """
    b, c = sample.baseline, sample.candidate
    return share_margin(
        gate, config, "scored probes",
        (c.probes_passed, c.probes), (b.probes_passed, b.probes),
        lambda share_c, share_b: (
            f"probes passed {c.probes_passed}/{c.probes} ({share_c:.3f}) vs "
            f"{b.probes_passed}/{b.probes} ({share_b:.3f}) since the stage began"
        ),
        "candidate fails more probes: ",
        detail={"passed_baseline": b.probes_passed, "passed_candidate": c.probes_passed,
                "pooled": "since the stage began"},
        says_non_inferiority=False,
    )  # fmt: skip
