"""Run candidate and baseline over the suites, score both, compare per suite.

A provider error on one item fails that item for that model (and says so in its output) instead
of stopping the run; a budget that runs out stops everything, since every later call would too.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from canaryflow.contracts import EvalItemResult, EvalReport, ModelManifest, OfflineGate
from canaryflow.errors import BudgetExceeded, ProviderError
from canaryflow.evaluation.compare import compare_suite, decide
from canaryflow.evaluation.scorers import score
from canaryflow.evaluation.suites import EvalItem, Suite, stratified_sample
from canaryflow.providers.client import Completion, ProviderClient

ERROR_PREFIX = "[provider error] "


@dataclass
class _Answer:
    text: str
    passed: bool
    completion: Completion | None


async def evaluate(
    candidate: ModelManifest,
    baseline: ModelManifest,
    suites: list[Suite],
    client: ProviderClient,
    gate: OfflineGate,
    sample_per_suite: int | None = None,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    baseline_client: ProviderClient | None = None,
) -> EvalReport:
    """Both models answer every sampled item: the candidate through `client`, the baseline
    through `baseline_client` when it lives at another provider (None: `client` too)."""
    started = time.perf_counter()
    work: list[tuple[Suite, EvalItem]] = []
    for suite in suites:
        items = suite.items
        chosen = stratified_sample(items, sample_per_suite, seed) if sample_per_suite else items
        work += [(suite, item) for item in chosen]

    total = 2 * len(work)
    done = 0

    async def answer(manifest: ModelManifest, item: EvalItem) -> _Answer:
        nonlocal done
        asked = baseline_client if manifest is baseline and baseline_client else client
        try:
            completion = await asked.complete(manifest, item.input)
        except ProviderError as exc:
            result = _Answer(f"{ERROR_PREFIX}{exc}", False, None)
        else:
            result = _Answer(completion.text, score(item, completion.text).passed, completion)
        done += 1
        if progress is not None:
            progress(done, total)
        return result

    try:
        async with asyncio.TaskGroup() as group:
            tasks = [
                (
                    suite,
                    item,
                    group.create_task(answer(baseline, item)),
                    group.create_task(answer(candidate, item)),
                )
                for suite, item in work
            ]
    except* BudgetExceeded as budget_errors:
        # The TaskGroup already cancelled the other calls; surface the budget's own message.
        raise budget_errors.exceptions[0] from None

    results: list[EvalItemResult] = []
    tokens, cost, cached = 0, 0.0, 0
    for suite, item, base_task, cand_task in tasks:
        base, cand = base_task.result(), cand_task.result()
        results.append(
            EvalItemResult(
                suite=suite.name,
                item_id=item.id,
                kind=item.kind,
                baseline_passed=base.passed,
                candidate_passed=cand.passed,
                baseline_output=base.text,
                candidate_output=cand.text,
            )
        )
        for a in (base, cand):
            if a.completion is None:
                continue
            if a.completion.cached:
                cached += 1
            else:
                tokens += a.completion.tokens_in + a.completion.tokens_out
                cost += a.completion.cost_usd

    comparisons = tuple(
        compare_suite(
            suite.name,
            [(r.baseline_passed, r.candidate_passed) for r in results if r.suite == suite.name],
            gate,
        )
        for suite in suites
    )
    return EvalReport(
        candidate=candidate.model_id,
        baseline=baseline.model_id,
        suites=comparisons,
        decision=decide(comparisons),
        items=tuple(results),
        tokens=tokens,
        cost_usd=cost,
        seconds=time.perf_counter() - started,
        cached=cached,
    )
