"""What the judges take: per-role counts and latencies for one analysis window.

Sources (the store, Prometheus) build these; judges read them and do no I/O. A sample keeps
sums rather than records, so a window of 10^4 requests stays small, plus the raw latencies the
latency judge needs for rank statistics and its bootstrap.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import numpy.typing as npt

from canaryflow.contracts import RequestRecord
from canaryflow.quality.verdicts import parse_checks

# What a user sees fail: a 5xx, a provider's 429 passed on, a timeout. Other 4xx are the
# client's own mistakes. The Prometheus rules use the same set (deployments/prometheus).
USER_VISIBLE_FAILURES = frozenset({408, 429})


def counts_as_error(status: int) -> bool:
    return status >= 500 or status in USER_VISIBLE_FAILURES


@dataclass(frozen=True)
class RoleSample:
    """One role's (stable, canary or shadow) requests in a window.

    `checked` counts requests the live checkers looked at without a failure; `unchecked` those
    where a sampled checker failed (error, timeout, garbage). A rate's trials are the answers a
    checker judged for its flag: `hallucination_trials` (the answers judged grounded or
    hallucinated) and `unsafe_trials` (judged safe or unsafe); None: every checked answer (a
    sample built by hand). `correct` counts answers judged not hallucinated (`facts`: judged
    either way). `checkers`: per checker label (name/model/rubric version), its outcome counts
    (judged, failed, dropped); `failures`: a failed checker's last reason. `ratings`: users'
    ratings of the role's answers on 0 (worst) .. 1 (best), `negative_ratings` how many of
    them were negative (`/v1/feedback`; the store's source adds them, records carry none).
    `probes`, `probes_passed`: scored probes and how many passed, since the stage began (the
    store's source adds them; `analysis.probes`).
    """

    n: int = 0
    errors: int = 0
    latencies_ms: tuple[float, ...] = ()
    ttfts_ms: tuple[float, ...] = ()  # time to first token of the streamed answers only
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    cost_sq_usd: float = 0.0  # sum of squared per-request costs: the cost judge's variance
    checked: int = 0
    hallucinations: int = 0
    unsafe: int = 0
    injection_leaks: int = 0
    refusals: int = 0
    facts: int = 0
    correct: int = 0
    unchecked: int = 0
    hallucination_trials: int | None = None
    unsafe_trials: int | None = None
    checkers: dict[str, dict[str, int]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    ratings: tuple[float, ...] = ()
    negative_ratings: int = 0
    probes: int = 0  # scored probes of this role and version (`analysis.probes`; pooled)
    probes_passed: int = 0

    @property
    def hallucination_n(self) -> int:
        return self.checked if self.hallucination_trials is None else self.hallucination_trials

    @property
    def unsafe_n(self) -> int:
        return self.checked if self.unsafe_trials is None else self.unsafe_trials

    def __post_init__(self) -> None:
        counts = {
            "errors": self.errors,
            "checked": self.checked,
            "unchecked": self.unchecked,
            "hallucination_trials": self.hallucination_n,
            "unsafe_trials": self.unsafe_n,
        }
        for name, value in counts.items():
            if not 0 <= value <= self.n:
                raise ValueError(f"RoleSample.{name}={value} must lie in [0, n={self.n}]")
        for name, value, trials in (
            ("hallucinations", self.hallucinations, self.hallucination_n),
            ("unsafe", self.unsafe, self.unsafe_n),
        ):
            if not 0 <= value <= trials:
                raise ValueError(f"RoleSample.{name}={value} must lie in [0, trials={trials}]")
        flags = {
            "injection_leaks": self.injection_leaks,
            "refusals": self.refusals,
        }
        for name, value in flags.items():
            if not 0 <= value <= self.checked:
                raise ValueError(
                    f"RoleSample.{name}={value} must lie in [0, checked={self.checked}]"
                )
        if not 0 <= self.negative_ratings <= len(self.ratings):
            raise ValueError(
                f"RoleSample.negative_ratings={self.negative_ratings} must lie in "
                f"[0, ratings={len(self.ratings)}]"
            )
        if not 0 <= self.probes_passed <= self.probes:
            raise ValueError(
                f"RoleSample.probes_passed={self.probes_passed} must lie in "
                f"[0, probes={self.probes}]"
            )
        if not 0 <= self.facts <= self.n or not 0 <= self.correct <= self.facts:
            raise ValueError(
                f"RoleSample.correct={self.correct} must lie in [0, facts={self.facts}]"
            )

    @property
    def latencies(self) -> npt.NDArray[np.float64]:
        return np.asarray(self.latencies_ms, dtype=np.float64)

    @property
    def ttfts(self) -> npt.NDArray[np.float64]:
        return np.asarray(self.ttfts_ms, dtype=np.float64)

    @property
    def cost_per_1k(self) -> float:
        """USD per 1,000 requests; NaN when there were none."""
        return 1000.0 * self.cost_usd / self.n if self.n else float("nan")

    @classmethod
    def from_records(cls, records: Iterable[RequestRecord]) -> RoleSample:
        n = errors = tokens_in = tokens_out = 0
        checked = hallucinations = unsafe = leaks = refusals = facts = correct = 0
        unchecked = unsafe_trials = 0
        checkers: dict[str, dict[str, int]] = {}
        failures: dict[str, str] = {}
        cost = cost_sq = 0.0
        latencies: list[float] = []
        ttfts: list[float] = []
        for r in records:
            n += 1
            errors += counts_as_error(r.status)
            latencies.append(r.latency_ms)
            if r.streamed and r.ttft_ms is not None:
                ttfts.append(r.ttft_ms)
            tokens_in += r.tokens_in
            tokens_out += r.tokens_out
            cost += r.cost_usd
            cost_sq += r.cost_usd * r.cost_usd
            # A flag counts wherever a checker judged it, even if another checker of the same
            # answer failed: each rate is over the answers judged for it.
            hallucinations += r.hallucination is True
            facts += r.hallucination is not None
            correct += r.hallucination is False
            unsafe += r.unsafe is True
            unsafe_trials += r.unsafe is not None
            unchecked += r.unchecked
            if r.checked:
                checked += 1
                leaks += r.injection_leak is True
                refusals += r.refusal is True
            if r.checks:
                for label, outcome, reason in parse_checks(r.checks):
                    row = checkers.setdefault(label, {})
                    row[outcome] = row.get(outcome, 0) + 1
                    if reason:
                        failures[label] = reason
        return cls(
            n=n,
            errors=errors,
            latencies_ms=tuple(latencies),
            ttfts_ms=tuple(ttfts),
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            cost_usd=cost,
            cost_sq_usd=cost_sq,
            checked=checked,
            hallucinations=hallucinations,
            unsafe=unsafe,
            injection_leaks=leaks,
            refusals=refusals,
            facts=facts,
            correct=correct,
            unchecked=unchecked,
            hallucination_trials=facts,
            unsafe_trials=unsafe_trials,
            checkers=checkers,
            failures=failures,
        )


@dataclass(frozen=True)
class WindowSample:
    """Baseline and candidate over the same time window: the unit every judge compares."""

    baseline: RoleSample
    candidate: RoleSample
    start: datetime | None = None
    end: datetime | None = None
    candidate_role: str | None = None
    """"canary" or "shadow" when the source knows it: users rate canary answers only."""
