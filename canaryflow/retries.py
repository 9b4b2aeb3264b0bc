"""What is worth retrying and how long to wait: one answer for the providers, the approvals, the
CI webhook and the Prefect tasks, so they cannot disagree.

Prefect-free: the core uses it, and the Prefect layer reads its policy (`TASK_RETRY`).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

from canaryflow.errors import RetryableError

# Timeouts, too early, rate limited, and the server-side failures that a later try can outlive.
RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


def is_retryable_status(status: int) -> bool:
    return status in RETRYABLE_STATUSES


def is_retryable(error: BaseException) -> bool:
    """True when the same call may succeed if tried again; bad input and bugs never do."""
    if isinstance(error, RetryableError | httpx.TransportError):
        return True
    if isinstance(error, httpx.HTTPStatusError):
        return is_retryable_status(error.response.status_code)
    return False


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header. None (use the policy's delay) for an HTTP date, which
    LLM and Prefect APIs rarely send, and for anything that is not a finite, non-negative number."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return seconds


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """`delays_s[n]` is the wait before retry n+1, so a call is tried `len(delays_s) + 1` times.

    `jitter` spreads each delay by ±that fraction, so that clients which failed together do not
    retry together; a server's Retry-After is honoured as given, capped at `max_delay_s`.
    """

    delays_s: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    jitter: float = 0.0
    max_delay_s: float = 60.0

    @property
    def attempts(self) -> int:
        return len(self.delays_s) + 1

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """The wait after failed attempt `attempt` (0 is the first)."""
        if retry_after is not None:
            return min(retry_after, self.max_delay_s)
        base = self.delays_s[min(attempt, len(self.delays_s) - 1)] if self.delays_s else 0.0
        if self.jitter:
            base *= random.uniform(1 - self.jitter, 1 + self.jitter)
        return min(base, self.max_delay_s)


DEFAULT = RetryPolicy()
# A task is retried only once the calls inside it have spent their own retries: wait longer.
TASK_RETRY = RetryPolicy(delays_s=(1.0, 3.0, 9.0))

Outcome = httpx.Response | Exception
RetryOn = Callable[[BaseException], bool]


def _wait(policy: RetryPolicy, attempt: int, outcome: Outcome, retry_on: RetryOn) -> float | None:
    """How long to wait before trying again, or None: the outcome is the caller's."""
    if isinstance(outcome, Exception):
        return policy.delay(attempt) if retry_on(outcome) else None
    if is_retryable_status(outcome.status_code):
        return policy.delay(attempt, retry_after(outcome.headers.get("retry-after")))
    return None


def _settle(outcome: Outcome) -> httpx.Response:
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def call(
    fn: Callable[[], httpx.Response],
    policy: RetryPolicy = DEFAULT,
    *,
    retry_on: RetryOn = is_retryable,
    sleep: Callable[[float], None] = time.sleep,
) -> httpx.Response:
    """`fn()` until it answers a status that is not retryable or raises what `retry_on` refuses;
    the last attempt's response is returned, or its exception raised, for the caller to word."""
    for attempt in range(policy.attempts - 1):
        try:
            outcome: Outcome = fn()
        except Exception as exc:
            outcome = exc
        if (wait := _wait(policy, attempt, outcome, retry_on)) is None:
            return _settle(outcome)
        sleep(wait)
    return fn()


async def acall(
    fn: Callable[[], Awaitable[httpx.Response]],
    policy: RetryPolicy = DEFAULT,
    *,
    retry_on: RetryOn = is_retryable,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> httpx.Response:
    """`call` for a coroutine function; waits without blocking the event loop."""
    for attempt in range(policy.attempts - 1):
        try:
            outcome: Outcome = await fn()
        except Exception as exc:
            outcome = exc
        if (wait := _wait(policy, attempt, outcome, retry_on)) is None:
            return _settle(outcome)
        await sleep(wait)
    return await fn()
