"""What the judges take: per-role counts and latencies for one analysis window.

Sources (the store, Prometheus) build these; judges read them and do no I/O. A sample keeps
sums rather than records, so a window of 10^4 requests stays small, plus the raw latencies the
latency judge needs for rank statistics and its bootstrap.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import numpy.typing as npt

from canaryflow.contracts import RequestRecord

# What a user sees fail: a 5xx, a provider's 429 passed on, a timeout. Other 4xx are the
# client's own mistakes. The Prometheus rules use the same set (deployments/prometheus).
USER_VISIBLE_FAILURES = frozenset({408, 429})


def counts_as_error(status: int) -> bool:
    return status >= 500 or status in USER_VISIBLE_FAILURES


@dataclass(frozen=True)
class RoleSample:
    """One role's (stable, canary or shadow) requests in a window.

    `checked` counts requests the quality checkers looked at: the denominator of the quality
    rates. `correct` counts checked answers whose fact check found no hallucination.
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

    def __post_init__(self) -> None:
        counts = {
            "errors": self.errors,
            "checked": self.checked,
        }
        for name, value in counts.items():
            if not 0 <= value <= self.n:
                raise ValueError(f"RoleSample.{name}={value} must lie in [0, n={self.n}]")
        flags = {
            "hallucinations": self.hallucinations,
            "unsafe": self.unsafe,
            "injection_leaks": self.injection_leaks,
            "refusals": self.refusals,
            "facts": self.facts,
        }
        for name, value in flags.items():
            if not 0 <= value <= self.checked:
                raise ValueError(
                    f"RoleSample.{name}={value} must lie in [0, checked={self.checked}]"
                )
        if not 0 <= self.correct <= self.facts:
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
            if r.checked:
                checked += 1
                hallucinations += r.hallucination is True
                facts += r.hallucination is not None
                correct += r.hallucination is False
                unsafe += r.unsafe is True
                leaks += r.injection_leak is True
                refusals += r.refusal is True
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
        )


@dataclass(frozen=True)
class WindowSample:
    """Baseline and candidate over the same time window: the unit every judge compares."""

    baseline: RoleSample
    candidate: RoleSample
    start: datetime | None = None
    end: datetime | None = None
