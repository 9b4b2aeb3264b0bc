"""Live checkers off the hot path: sampling, a budget, a bounded queue per checker, counters.

Why this shape: a user's answer must never wait for a judge. `submit` decides at once, without
awaiting anything, whether each checker takes the item (its sample rate, its budget) and puts it
on that checker's bounded queue; a full queue drops the item and counts the drop. Workers call the
checkers with their timeout; every outcome goes to the caller's `on_result` (the caller decides
where results go: the store, metrics, a file). Nothing here writes anywhere or imports Prefect.

Budget: calls per minute are counted when an item is taken (so many in flight cannot overshoot
together), dollars per hour from what each result cost (the judge's usage x the providers-file
entry's price). Past either ceiling a checker samples at its fallback rate
(`CheckerBudget.fallback_sample_rate`, default a tenth of its rate); every item the normal rate
would have taken but the fallback did not counts as `over_budget`.

Sampling per role: besides its `sample_rate`, a checker takes at least `min_per_s` items per
second of each role (a token bucket per role), so a small canary share is judged often enough for
its window's gates while the stable majority is sampled lightly.

Counters per checker: `judged` (a verdict came back), `skipped` (not sampled), `failed` (an
UNCHECKED outcome: error, timeout, refusal, garbage), `dropped` (queue full), `over_budget`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from canaryflow.contracts import CheckerBudget, CheckerConfig, ProvidersFile
from canaryflow.errors import ConfigError
from canaryflow.quality.verdicts import CheckItem, CheckResult, LiveChecker, Outcome, unchecked

log = logging.getLogger("canaryflow.checkers")

ResultCallback = Callable[[CheckResult], Awaitable[None] | None]


@dataclass(slots=True)
class CheckerCounters:
    judged: int = 0
    skipped: int = 0
    failed: int = 0
    dropped: int = 0
    over_budget: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class BudgetWindow:
    """Calls in the last minute and dollars in the last hour, against a `CheckerBudget`."""

    def __init__(self, budget: CheckerBudget, clock: Callable[[], float] = time.monotonic) -> None:
        self.budget, self._clock = budget, clock
        self._calls: deque[float] = deque()
        self._spend: deque[tuple[float, float]] = deque()
        self._spent = 0.0

    def exhausted(self) -> bool:
        now = self._clock()
        while self._calls and self._calls[0] <= now - 60:
            self._calls.popleft()
        while self._spend and self._spend[0][0] <= now - 3600:
            self._spent -= self._spend.popleft()[1]
        if self.budget.calls_per_min is not None and len(self._calls) >= self.budget.calls_per_min:
            return True
        return self.budget.usd_per_hour is not None and self._spent >= self.budget.usd_per_hour

    def take(self) -> None:
        self._calls.append(self._clock())

    def charge(self, usd: float) -> None:
        if usd > 0:
            self._spend.append((self._clock(), usd))
            self._spent += usd

    @property
    def spent_usd(self) -> float:
        return self._spent


class Sampler:
    """Whether a checker takes an item: its sample rate, per-role floor and budget, counted.

    Shared by the in-process pipeline and the checker process's parent side
    (`quality.remote`), so an item is sampled the same way wherever it is checked."""

    def __init__(self, config: CheckerConfig, rng: random.Random) -> None:
        self.config = config
        self.budget = BudgetWindow(config.budget)
        self.counters = CheckerCounters()
        self.rng = rng
        # The per-role floor (`min_per_s`): a token bucket per role holding at most one
        # second's worth; every item taken spends a token when there is one.
        self._floor: dict[str, tuple[float, float]] = {}

    def _floor_token(self, role: str, spend: bool) -> bool:
        rate = self.config.min_per_s
        if rate <= 0:
            return False
        now = time.monotonic()
        tokens, since = self._floor.get(role, (rate, now))
        tokens = min(rate, tokens + (now - since) * rate)
        has = tokens >= 1.0
        if has and spend:
            tokens -= 1.0
        self._floor[role] = (tokens, now)
        return has

    def wants(self, role: str) -> bool:
        """Sampled and within budget (else counted as skipped or over budget)."""
        draw = self.rng.random()
        floor = self._floor_token(role, spend=False)
        if draw >= self.config.rate_for(role) and not floor:
            self.counters.skipped += 1
            return False
        if self.budget.exhausted() and draw >= self.config.fallback_rate(role):
            self.counters.over_budget += 1
            return False
        return True

    def took(self, role: str) -> None:
        """The item was queued: it spends a call of the budget and a floor token."""
        self.budget.take()
        self._floor_token(role, spend=True)

    def count(self, result: CheckResult) -> None:
        """A result came back: charge what it cost and count its outcome."""
        self.budget.charge(result.cost_usd)
        if result.unchecked:
            self.counters.failed += 1
        else:
            self.counters.judged += 1


class _Lane:
    """One checker's sampler, queue and workers."""

    def __init__(self, checker: LiveChecker, queue_size: int, rng: random.Random) -> None:
        self.checker = checker
        self.config = checker.config
        self.queue: asyncio.Queue[CheckItem] = asyncio.Queue(maxsize=queue_size)
        self.sampler = Sampler(self.config, rng)
        self.counters = self.sampler.counters
        self.budget = self.sampler.budget

    def offer(self, item: CheckItem) -> bool:
        if not self.sampler.wants(item.role):
            return False
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.counters.dropped += 1
            return False
        self.sampler.took(item.role)
        return True


class CheckerPipeline:
    """`submit(item)` from the request path; results to `on_result` from background workers.

    `async with CheckerPipeline(checkers, on_result) as pipeline:` starts the checkers'
    connections and workers and, on exit, stops them (`drain=True` in `aclose` finishes what is
    queued first)."""

    def __init__(
        self,
        checkers: Sequence[LiveChecker],
        on_result: ResultCallback,
        *,
        queue_size: int = 1000,
        workers: int = 4,
        seed: int | None = None,
    ) -> None:
        if queue_size < 1 or workers < 1:
            raise ConfigError("checker pipeline: queue_size and workers must be at least 1")
        names = [c.name for c in checkers]
        if len(set(names)) != len(names):
            raise ConfigError(f"checker names must be distinct, got {names}")
        rng = random.Random(seed)
        self.lanes = {c.name: _Lane(c, queue_size, rng) for c in checkers}
        self.on_result = on_result
        self.workers = workers
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def counters(self) -> dict[str, CheckerCounters]:
        return {name: lane.counters for name, lane in self.lanes.items()}

    def snapshot(self) -> dict[str, dict[str, int]]:
        return {name: lane.counters.as_dict() for name, lane in self.lanes.items()}

    def spent_usd(self) -> dict[str, float]:
        """Dollars each checker spent in the last hour."""
        return {name: lane.budget.spent_usd for name, lane in self.lanes.items()}

    def submit(self, item: CheckItem) -> int:
        """Offer `item` to every checker; never waits. Returns how many took it."""
        return len(self.submit_to(item))

    def submit_to(self, item: CheckItem) -> list[str]:
        """Offer `item` to every checker; never waits. Returns the names of those that took it
        (each will deliver exactly one result for it)."""
        return [name for name, lane in self.lanes.items() if lane.offer(item)]

    def config_of(self, name: str) -> CheckerConfig:
        return self.lanes[name].config

    @property
    def configs(self) -> dict[str, CheckerConfig]:
        return {name: lane.config for name, lane in self.lanes.items()}

    def enqueue(self, item: CheckItem, names: Sequence[str]) -> list[str]:
        """Queue `item` for the named checkers, already sampled elsewhere (the checker
        process's parent); a full queue drops it, counted. Returns the names that took it."""
        taken = []
        for name in names:
            lane = self.lanes[name]
            try:
                lane.queue.put_nowait(item)
            except asyncio.QueueFull:
                lane.counters.dropped += 1
            else:
                taken.append(name)
        return taken

    @property
    def longest_timeout_s(self) -> float:
        """The longest a result can take once its item is picked up (the checker's timeout
        and the pipeline's own second of grace)."""
        return max((lane.config.timeout_s + 1.0 for lane in self.lanes.values()), default=0.0)

    async def start(self) -> CheckerPipeline:
        for lane in self.lanes.values():
            await lane.checker.start()
            self._tasks.extend(
                asyncio.create_task(self._work(lane), name=f"checker-{lane.checker.name}")
                for _ in range(self.workers)
            )
        return self

    async def __aenter__(self) -> CheckerPipeline:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def join(self) -> None:
        """Wait until every queued item has a result."""
        await asyncio.gather(*(lane.queue.join() for lane in self.lanes.values()))

    async def aclose(self, drain: bool = False) -> None:
        if drain:
            await self.join()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        for lane in self.lanes.values():
            await lane.checker.aclose()

    async def _work(self, lane: _Lane) -> None:
        while True:
            item = await lane.queue.get()
            try:
                result = await self._check(lane, item)
                lane.sampler.count(result)
                await self._deliver(result)
            finally:
                lane.queue.task_done()

    async def _check(self, lane: _Lane, item: CheckItem) -> CheckResult:
        checker, config = lane.checker, lane.config
        kind = config.kind
        try:
            # The checker keeps its own deadline; this one catches a checker that does not.
            async with asyncio.timeout(config.timeout_s + 1.0):
                verdicts = tuple(await checker.check(item))
        except TimeoutError:
            why = f"{checker.name} gave no answer within {config.timeout_s:g} s"
            verdicts = unchecked(checker.name, ("check",), why)
        except Exception as exc:  # a checker's bug must not stop the pipeline
            log.warning("checker %s failed: %s", checker.name, type(exc).__name__)
            verdicts = unchecked(checker.name, ("check",), f"{type(exc).__name__}: {exc}")
        if not verdicts:
            verdicts = unchecked(checker.name, ("check",), "the checker returned no verdict")
        return CheckResult(item, checker.name, kind, verdicts)

    async def _deliver(self, result: CheckResult) -> None:
        try:
            outcome = self.on_result(result)
            if inspect.isawaitable(outcome):
                await outcome
        except Exception:
            log.exception("the checker result callback failed for %s", result.checker)


def build_checkers(
    configs: Sequence[CheckerConfig],
    providers: ProvidersFile | None = None,
    environ: Mapping[str, str] | None = None,
    source: str = "providers",
) -> list[LiveChecker]:
    """One checker per configuration. Kinds that are not live checkers of answers (feedback,
    probes: they need the model service's routes) are refused with what to do instead."""
    from canaryflow.quality.facts import FactDatabaseCheck
    from canaryflow.quality.llm_judge import LlmJudge
    from canaryflow.quality.moderation import Moderation
    from canaryflow.quality.patterns import Patterns

    built: list[LiveChecker] = []
    for config in configs:
        if config.kind in ("llm_judge", "moderation") and providers is None:
            raise ConfigError(
                f"checker {config.label} calls provider {getattr(config, 'provider', '?')!r}: "
                "pass the providers file"
            )
        if config.kind == "llm_judge":
            assert providers is not None
            built.append(LlmJudge(config, providers, environ, source))
        elif config.kind == "moderation":
            assert providers is not None
            built.append(Moderation(config, providers, environ, source))
        elif config.kind == "fact_database":
            built.append(FactDatabaseCheck(config))
        elif config.kind == "patterns":
            built.append(Patterns(config))
        else:
            raise ConfigError(
                f"checker {config.label}: kind {config.kind} is not run by the checker pipeline "
                "(it is served by the model service); remove it from this list"
            )
    return built


def summary(results: Sequence[CheckResult]) -> dict[str, Any]:
    """Counts by flag and outcome, for logs and tests."""
    counts: dict[str, dict[str, int]] = {}
    for result in results:
        for verdict in result.verdicts:
            row = counts.setdefault(verdict.flag, {o.value: 0 for o in Outcome})
            row[verdict.outcome.value] += 1
    return counts
