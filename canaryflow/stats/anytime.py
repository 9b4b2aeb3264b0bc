"""Anytime-valid two-sample tests, candidate against baseline in the same windows.

`sequential.SequentialState` asks "is the candidate's rate above a fixed bound?". The tests here
ask "is the candidate worse than the baseline it runs beside?", window after window, with one
error budget however often one looks: each is an e-process (a nonnegative process whose
expectation under the null stays at most 1), rejected once it reaches 1/alpha, so by Ville's
inequality a candidate no worse than its baseline is rejected with probability at most alpha
over the whole sequence. Plain JSON state, like `SequentialState`: `update` returns a new one.

- `ShareState`: the candidate's share of the events (errors, flags, slow requests) given each
  role's trials in the window.
- `RankState`: a Mann-Whitney z per window, combined by a one-sided normal-mixture martingale.
- `upper_tail_counts`: per window, who sits above the pooled 95th percentile; `ShareState` with
  ratio 1 makes it a test of the upper tail that a shift of the median cannot mask.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
from pydantic import Field

from canaryflow.stats.sequential import EProcessState

Floats = npt.NDArray[np.float64]
MAX_LOG_E = 700.0  # keeps e-values finite, so the state stays plain JSON
# The alternatives mixed: the candidate's odds of an event at 1.5x ... 10x the null's, weighted
# toward 2x-3x (what a release must catch within minutes; 10x is caught at once at any weight).
SHARE_RATIOS = (1.5, 2.0, 3.0, 5.0, 10.0)
SHARE_WEIGHTS = (2.0 / 9, 3.0 / 9, 2.0 / 9, 1.0 / 9, 1.0 / 9)
SHARE_THETAS = tuple(math.log(r) for r in SHARE_RATIOS)
_LOG_WEIGHTS = tuple(math.log(w) for w in SHARE_WEIGHTS)
# The rank test's prior on the drift of z per window: half-normal with precision 1 (sd 1).
PRIOR_PRECISION = 1.0
MIN_PER_SIDE = 10  # fewer latencies per role and a window's z is not close to normal: skipped
# The tail test's pooled percentile. The latency gates' own p95: at p90 a 5% tail 4x slower is
# mostly hidden by the 5% tolerance (caught in 16% of simulated releases within 10 windows,
# against all of them at p95).
TAIL_QUANTILE = 0.95


def _clip(log_e: float) -> float:
    return max(-MAX_LOG_E, min(MAX_LOG_E, log_e))


def _logsumexp(values: tuple[float, ...]) -> float:
    top = max(values)
    return top + math.log(math.fsum(math.exp(v - top) for v in values))


class ShareState(EProcessState):
    """One-sided test of H0: candidate rate <= `ratio` x baseline rate, across windows.

    Per window the candidate has `ec` events in `nc` trials, the baseline `eb` in `nb`. Under
    H0 an event of the window is the candidate's with probability at most
    pi = ratio*nc / (ratio*nc + nb): the observed split of the window, not the nominal weight,
    so a canary that got 3% of the traffic instead of 5% is compared at 3%. For a shift theta
    of the log-odds, p = expit(logit(pi) + theta), the window's factor is

        F = (p/pi)^ec * ((1-p)/(1-pi))^eb.

    Why E[F] <= 1 under H0, for every theta >= 0: with independent binomial (or any sums of
    independent Bernoulli) counts, E[a^ec] <= exp(nc*pc*(a-1)) by 1+x <= e^x, so
    log E[F] <= (p - pi) * (ratio*nc + nb) * (pc/ratio - pb) <= 0 whenever pc <= ratio*pb.
    No Poisson approximation and no conditioning on the events' total is needed; only the
    trials are taken as given (traffic decides them, not the outcomes). For a hypergeometric
    ec given ec+eb (the upper-tail counts), E[F | ec+eb] <= 1 the same way: sampling without
    replacement is dominated in convex order by sampling with replacement, and
    (pi*p/pi + (1-pi)*(1-p)/(1-pi))^k = 1.

    The product of the factors over windows is a nonnegative supermartingale for each theta,
    and so is their mixture over `SHARE_THETAS` (fixed weights summing to 1); reject when it
    reaches 1/alpha.
    One-sided: every theta > 0 puts more weight on the candidate's events, so a better
    candidate (pc < pb) drives the mixture toward 0 and can never be rejected by it. A window
    without trials on either side, or without events, changes nothing.
    """

    ratio: float = Field(1.0, ge=1.0)
    events_candidate: int = Field(0, ge=0)
    trials_candidate: int = Field(0, ge=0)
    events_baseline: int = Field(0, ge=0)
    trials_baseline: int = Field(0, ge=0)
    log_lr: tuple[float, ...] = (0.0,) * len(SHARE_THETAS)

    @classmethod
    def start(cls, ratio: float, alpha: float) -> ShareState:
        return cls(ratio=ratio, alpha=alpha)

    @property
    def share_bound(self) -> float | None:
        """pi over all windows' trials: the candidate's share of the events H0 allows."""
        weighted = self.ratio * self.trials_candidate
        total = weighted + self.trials_baseline
        return weighted / total if total else None

    def update(self, ec: int, nc: int, eb: int, nb: int) -> ShareState:
        """Add one window. Rejection is final: Ville's bound covers the running maximum."""
        for events, trials in ((ec, nc), (eb, nb)):
            if not 0 <= events <= trials:
                raise ValueError(f"need 0 <= events <= trials, got {events}/{trials}")
        log_lr = self.log_lr
        if nc > 0 and nb > 0 and ec + eb > 0:
            log_lr = tuple(
                _clip(ll + window_log_lr(ec, nc, eb, nb, self.ratio, theta))
                for ll, theta in zip(self.log_lr, SHARE_THETAS, strict=True)
            )
        log_e = _clip(_logsumexp(tuple(ll + w for ll, w in zip(log_lr, _LOG_WEIGHTS, strict=True))))
        windows = self.windows + 1
        crossed = log_e >= -math.log(self.alpha)
        return self.model_copy(
            update={
                "events_candidate": self.events_candidate + ec,
                "trials_candidate": self.trials_candidate + nc,
                "events_baseline": self.events_baseline + eb,
                "trials_baseline": self.trials_baseline + nb,
                "windows": windows,
                "log_lr": log_lr,
                "log_e": log_e,
                "max_log_e": max(self.max_log_e, log_e),
                "rejected_at": self.rejected_at or (windows if crossed else None),
            }
        )


def window_log_lr(ec: int, nc: int, eb: int, nb: int, ratio: float, theta: float) -> float:
    """log F of one window for one theta (see `ShareState`)."""
    log_odds = math.log(ratio * nc / nb)  # logit(pi)
    # log p - log pi and log(1-p) - log(1-pi), in a form that stays exact for tiny pi
    log_p_ratio = -math.log1p(math.exp(-(log_odds + theta))) + math.log1p(math.exp(-log_odds))
    log_q_ratio = -math.log1p(math.exp(log_odds + theta)) + math.log1p(math.exp(log_odds))
    return ec * log_p_ratio + eb * log_q_ratio


def mann_whitney_z(candidate: Floats, baseline: Floats) -> float:
    """Standardized Mann-Whitney U of candidate over baseline (positive: candidate larger),
    with the tie-corrected variance of the normal approximation."""
    from scipy.stats import rankdata

    nc, nb = len(candidate), len(baseline)
    n = nc + nb
    ranks = rankdata(np.concatenate([candidate, baseline]))
    u = float(ranks[:nc].sum()) - nc * (nc + 1) / 2.0
    _, counts = np.unique(ranks, return_counts=True)
    ties = float((counts.astype(np.float64) ** 3 - counts).sum())
    variance = nc * nb / 12.0 * ((n + 1) - ties / (n * (n - 1)))
    if variance <= 0.0:
        return 0.0  # every value equal: no evidence either way
    return (u - nc * nb / 2.0) / math.sqrt(variance)


def normal_mixture_log_e(z_sum: float, looks: int, precision: float = PRIOR_PRECISION) -> float:
    """log of the one-sided normal-mixture martingale over S = sum of z, t = looks:

        E = 2 sqrt(c/(t+c)) exp(S^2 / (2(t+c))) Phi(S / sqrt(t+c)),

    the average of exp(lambda*S - lambda^2*t/2) over a half-normal prior on lambda > 0 with
    precision c. Each exp(lambda*z - lambda^2/2) has expectation 1 for a standard normal z and
    less for a z shifted down, so the mixture is a nonnegative (super)martingale in t.
    """
    from scipy.special import log_ndtr

    if looks == 0:
        return 0.0
    spread = looks + precision
    log_e = (
        math.log(2.0)
        + 0.5 * math.log(precision / spread)
        + z_sum * z_sum / (2.0 * spread)
        + float(log_ndtr(z_sum / math.sqrt(spread)))
    )
    return _clip(log_e)


class RankState(EProcessState):
    """One-sided sequential rank test of H0: candidate <= (1 + tolerance) x baseline in
    distribution, across windows.

    Per window with at least `MIN_PER_SIDE` values per role: z = the Mann-Whitney statistic of
    the candidate's values against the baseline's scaled by 1 + tolerance, standardized (see
    `mann_whitney_z`). Under H0's boundary (candidate distributed as the scaled baseline) z is
    close to N(0, 1) given the window's sizes, independently of earlier windows, and under the
    rest of H0 it is shifted down. The rank sum is lighter-tailed than the normal (its
    summands are uniform-like), so the normal mixture of `normal_mixture_log_e` keeps its
    expectation at most ~1; the A/A simulations of the tests check it under continuous looks.
    The prior's precision c = 1 puts its mass on drifts of up to ~2 standard errors per
    window: a regression worth catching moves one window's z by about that much or more, and a
    far larger one still crosses at once (E grows like exp(S^2 / 2(t+1))).
    """

    tolerance: float = Field(0.0, ge=0.0)
    looks: int = Field(0, ge=0, description="windows with enough values per role to count")
    z_sum: float = 0.0
    last_z: float | None = None
    n_candidate: int = Field(0, ge=0)
    n_baseline: int = Field(0, ge=0)

    @classmethod
    def start(cls, tolerance: float, alpha: float) -> RankState:
        return cls(tolerance=tolerance, alpha=alpha)

    def update(self, candidate: Floats, baseline: Floats) -> RankState:
        """Add one window's values (e.g. latencies in ms); too few per side changes nothing."""
        windows = self.windows + 1
        if min(len(candidate), len(baseline)) < MIN_PER_SIDE:
            return self.model_copy(update={"windows": windows, "last_z": None})
        z = mann_whitney_z(candidate, (1.0 + self.tolerance) * baseline)
        looks, z_sum = self.looks + 1, self.z_sum + z
        log_e = normal_mixture_log_e(z_sum, looks)
        crossed = log_e >= -math.log(self.alpha)
        return self.model_copy(
            update={
                "windows": windows,
                "looks": looks,
                "z_sum": z_sum,
                "last_z": z,
                "n_candidate": self.n_candidate + len(candidate),
                "n_baseline": self.n_baseline + len(baseline),
                "log_e": log_e,
                "max_log_e": max(self.max_log_e, log_e),
                "rejected_at": self.rejected_at or (windows if crossed else None),
            }
        )


def upper_tail_counts(
    candidate: Floats, baseline: Floats, quantile: float = TAIL_QUANTILE
) -> tuple[int, int]:
    """(candidate, baseline) values strictly above the pooled `quantile` of both samples.

    Pooled rather than the baseline's own percentile: an estimated percentile of one side is
    noisy, and a fixed-threshold test of the other side against "10% above it" would count
    that noise as evidence (with equal splits, many times over alpha). Given the pooled
    values, under exchangeability the candidate's count is hypergeometric, which
    `ShareState` at ratio 1 covers; a candidate stochastically smaller only lowers it.
    """
    pooled = np.sort(np.concatenate([candidate, baseline]))
    if len(pooled) == 0:
        return 0, 0
    rank = max(1, math.ceil(quantile * len(pooled)))
    threshold = pooled[rank - 1]
    return int((candidate > threshold).sum()), int((baseline > threshold).sum())
