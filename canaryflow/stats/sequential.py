"""Anytime-valid tests of a Bernoulli rate against a bound, carried across canary windows.

A canary is judged every window, and the flow stops at the first failure. A fixed-sample test
run at every look would fail a candidate that sits exactly at the bound far more often than its
alpha (with 20 looks at 5%, up to ~1 in 3). Here each rate gate carries an e-process instead: a
mixture likelihood ratio over the cumulative counts, rejected once it reaches 1/alpha. By
Ville's inequality, the chance that it ever gets there when the true rate is at or below the
bound is at most alpha, however often one looks.

The e-process tests H0: p <= bound against H1: p > bound. The alternative is a Beta(1, b)
prior truncated to (bound, 1], with mean near 4 x bound: for every p below the bound each
factor of the likelihood ratio has expectation at most 1, so the composite null is covered,
not just p = bound. With a 0.5% bound it takes 5 events out of 200 in one window to reject
(a fixed-sample exact test needs 4), and a candidate at 4x the bound is rejected in about two
windows of 200.
"""

from __future__ import annotations

import math

from pydantic import Field

from canaryflow.contracts import Frozen

PRIOR_MEAN_FACTOR = 4.0
MAX_LOG_E = 700.0  # keeps e-values finite, so the state stays plain JSON


class EProcessState(Frozen):
    """What every e-process of a gate keeps between windows (this module's, and those of
    `anytime`): its alpha, the log e-value now and at its highest, and the window that crossed
    1/alpha. Plain data, so the judge's memory stays JSON."""

    alpha: float = Field(gt=0.0, lt=1.0)
    windows: int = Field(0, ge=0)
    log_e: float = 0.0
    max_log_e: float = 0.0
    rejected_at: int | None = Field(None, description="window (1-based) that crossed 1/alpha")

    @property
    def e_value(self) -> float:
        return math.exp(self.log_e)

    @property
    def rejected(self) -> bool:
        return self.rejected_at is not None

    @property
    def p_value(self) -> float:
        """Anytime-valid p-value: 1 / the largest e-value seen so far."""
        return min(1.0, math.exp(-self.max_log_e))


class SequentialState(EProcessState):
    """The running test of one rate gate; the caller keeps it between windows.

    Plain data (`model_dump(mode="json")` / `model_validate`), so it can live in a Prefect
    task result or the release ledger. Start a new one for every candidate.
    """

    bound: float = Field(ge=0.0, le=1.0)
    events: int = Field(0, ge=0)
    trials: int = Field(0, ge=0)

    @classmethod
    def start(cls, bound: float, alpha: float) -> SequentialState:
        return cls(bound=bound, alpha=alpha)

    def update(self, events: int, trials: int) -> SequentialState:
        """Add one window's counts. Rejection is final: Ville's bound covers the running max."""
        if not 0 <= events <= trials:
            raise ValueError(
                f"window counts must satisfy 0 <= events <= trials, got {events}/{trials}"
            )
        total_events, total_trials = self.events + events, self.trials + trials
        log_e = mixture_log_e(total_events, total_trials, self.bound)
        windows = self.windows + 1
        crossed = log_e >= -math.log(self.alpha)
        return self.model_copy(
            update={
                "events": total_events,
                "trials": total_trials,
                "windows": windows,
                "log_e": log_e,
                "max_log_e": max(self.max_log_e, log_e),
                "rejected_at": self.rejected_at or (windows if crossed else None),
            }
        )


def prior_parameters(bound: float) -> tuple[float, float]:
    """Beta(1, b) with mean PRIOR_MEAN_FACTOR x bound (at most halfway from the bound to 1)."""
    mean = min(PRIOR_MEAN_FACTOR * bound, (1.0 + bound) / 2.0)
    return 1.0, (1.0 - mean) / mean


def mixture_log_e(events: int, trials: int, bound: float) -> float:
    """log of the truncated Beta-binomial mixture likelihood ratio against p = bound."""
    from scipy.special import betaincc, betaln

    if bound <= 0.0:
        # The null is "never": one event refutes it, none leaves the ratio below 1.
        return MAX_LOG_E if events > 0 else 0.0
    if bound >= 1.0:
        return 0.0
    a, b = prior_parameters(bound)
    tail_post = float(betaincc(a + events, b + trials - events, bound))
    tail_prior = float(betaincc(a, b, bound))
    if tail_post <= 0.0:
        return -MAX_LOG_E  # all posterior mass below the bound: no evidence against it
    log_e = (
        float(betaln(a + events, b + trials - events))
        + math.log(tail_post)
        - float(betaln(a, b))
        - math.log(tail_prior)
        - events * math.log(bound)
        - (trials - events) * math.log1p(-bound)
    )
    return max(-MAX_LOG_E, min(MAX_LOG_E, log_e))
