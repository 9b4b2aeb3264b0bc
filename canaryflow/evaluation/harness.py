"""Run candidate and baseline over the suites, score both, compare per suite.

A provider error on one item fails that item for that model (and says so in its output) instead
of stopping the run; a budget that runs out stops everything, since every later call would too.
Each item names its scorer: a text scorer reads each answer alone, a model-backed one (embedding
similarity, the pairwise judge) sees both; a pair its scorer could not tell is left out of the
comparison.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from canaryflow.contracts import (
    EvalItemResult,
    EvalReport,
    ModelManifest,
    OfflineGate,
    SuiteComparison,
)
from canaryflow.errors import BudgetExceeded, ProviderError
from canaryflow.evaluation.compare import compare_suite, decide
from canaryflow.evaluation.model_scorers import ModelScorers, Scores, require
from canaryflow.evaluation.scorers import ScoreResult, score
from canaryflow.evaluation.suites import MODEL_SCORERS, EvalItem, Suite, stratified_sample
from canaryflow.providers.client import Completion, ProviderClient

ERROR_PREFIX = "[provider error] "


@dataclass
class _Answer:
    text: str
    completion: Completion | None  # None: the call failed, `text` says how

    @property
    def answered(self) -> str | None:
        return self.text if self.completion is not None else None


async def _score(
    item: EvalItem, base: _Answer, cand: _Answer, models: ModelScorers | None
) -> Scores:
    """(baseline, candidate) by the item's own scorer; a model that gave no answer fails."""
    if item.scorer in MODEL_SCORERS:
        assert models is not None  # `require` checked this before any call
        return await models.score(item, base.answered, cand.answered)

    def alone(answer: _Answer) -> ScoreResult:
        if answer.completion is None:
            return ScoreResult(False, "no answer")
        return score(item, answer.text)

    return alone(base), alone(cand)


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
    scorer_models: ModelScorers | None = None,
) -> EvalReport:
    """Both models answer every sampled item: the candidate through `client`, the baseline
    through `baseline_client` when it lives at another provider (None: `client` too).
    `scorer_models` serves the items whose scorer calls a model; without it such items are a
    ConfigError, raised before any call."""
    started = time.perf_counter()
    work: list[tuple[Suite, EvalItem]] = []
    for suite in suites:
        items = suite.items
        chosen = stratified_sample(items, sample_per_suite, seed) if sample_per_suite else items
        work += [(suite, item) for item in chosen]
    require(scorer_models, {item.scorer for _, item in work})

    total = 2 * len(work)
    done = 0

    async def answer(manifest: ModelManifest, item: EvalItem) -> _Answer:
        nonlocal done
        asked = baseline_client if manifest is baseline and baseline_client else client
        try:
            completion = await asked.complete(manifest, item.input)
        except ProviderError as exc:
            result = _Answer(f"{ERROR_PREFIX}{exc}", None)
        else:
            result = _Answer(completion.text, completion)
        done += 1
        if progress is not None:
            progress(done, total)
        return result

    try:
        async with asyncio.TaskGroup() as group:
            tasks = [
                (
                    group.create_task(answer(baseline, item)),
                    group.create_task(answer(candidate, item)),
                )
                for _, item in work
            ]
    except* BudgetExceeded as budget_errors:
        # The TaskGroup already cancelled the other calls; surface the budget's own message.
        raise budget_errors.exceptions[0] from None

    answers = [(base.result(), cand.result()) for base, cand in tasks]
    scores = await asyncio.gather(
        *(_score(item, *pair, scorer_models) for (_, item), pair in zip(work, answers, strict=True))
    )
    results: list[EvalItemResult] = []
    tokens, cost, cached = 0, 0.0, 0
    for (suite, item), (base, cand), (base_score, cand_score) in zip(
        work, answers, scores, strict=True
    ):
        not_scored = next((s.reason for s in (base_score, cand_score) if not s.scored), None)
        results.append(
            EvalItemResult(
                suite=suite.name,
                item_id=item.id,
                kind=item.kind,
                baseline_passed=base_score.passed,
                candidate_passed=cand_score.passed,
                baseline_output=base.text,
                candidate_output=cand.text,
                unscored=not_scored,
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

    comparisons = tuple(_compare(suite.name, results, gate) for suite in suites)
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


def _compare(suite_name: str, results: list[EvalItemResult], gate: OfflineGate) -> SuiteComparison:
    """The suite's scored pairs; an unscored pair is missing evidence, left out and counted."""
    mine = [r for r in results if r.suite == suite_name]
    scored = [(r.baseline_passed, r.candidate_passed) for r in mine if r.unscored is None]
    return compare_suite(suite_name, scored, gate, unscored=len(mine) - len(scored))
