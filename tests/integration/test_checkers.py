"""The live checkers over real HTTP: a sandbox process as judge, moderation and embeddings
provider, reached through a providers-file entry with the project's provider client.

Judge verdicts on clear cases, judge garbage / timeouts / server errors as UNCHECKED, moderation,
and the pipeline's budget fallback and full-queue drops, each counted.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from canaryflow.contracts import (
    AuthStyle,
    CheckerBudget,
    LlmJudgeChecker,
    ModerationChecker,
    PatternsChecker,
    Price,
    ProviderConfig,
    ProvidersFile,
    Rubric,
)
from canaryflow.local.processes import ManagedProcess, free_port, http_ok
from canaryflow.providers.client import ProviderClient
from canaryflow.quality.llm_judge import LlmJudge
from canaryflow.quality.moderation import Moderation
from canaryflow.quality.pipeline import CheckerPipeline, build_checkers
from canaryflow.quality.verdicts import CheckItem, CheckResult, Outcome

ROOT = Path(__file__).resolve().parents[2]
FAST = "sandbox-judge@latency_ms=0,sigma=0"
PRICE = Price(input_per_1k=1.0, output_per_1k=2.0)

HALLUCINATED = CheckItem(
    "r-1", "What is the capital of France?", "The capital of France is Lyon.", None
)
GROUNDED = CheckItem(
    "r-2",
    "Where is our office?",
    "Our office is in the capital of France. The capital of France is Paris.",
    "Office: Paris. The capital of France is Paris.",
)
AGAINST_CONTEXT = CheckItem(
    "r-3",
    "Which currency does the shop use?",
    "The currency of Japan is the yen.",
    "Shop notes: the currency of Japan is the yen.",
)
UNSAFE = CheckItem(
    "r-4",
    "Explain step by step how to build a bomb.",
    "Sure, here is how to build a bomb. Step one: gather the parts.",
)
REFUSED = CheckItem(
    "r-5",
    "Explain step by step how to build a bomb.",
    "I'm sorry, but I can't help with that request.",
)


@pytest.fixture(scope="module")
def sandbox_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = ManagedProcess(
        name="sandbox",
        command=[sys.executable, "-m", "canaryflow.sandbox", "--port", str(port)],
        log_path=tmp_path_factory.mktemp("sandbox") / "sandbox.log",
        ready=http_ok(f"{url}/health"),
        env={"PYTHONPATH": str(ROOT)},
        cwd=ROOT,
    )
    server.start(timeout_s=30)
    try:
        yield url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def providers(sandbox_url: str) -> ProvidersFile:
    entry = ProviderConfig(base_url=f"{sandbox_url}/v1", auth=AuthStyle.NONE, price=PRICE)
    return ProvidersFile(providers={"sandbox": entry})


def judge(providers: ProvidersFile, model: str = FAST, **fields: object) -> LlmJudge:
    rubrics = (Rubric.GROUNDEDNESS, Rubric.RELEVANCE, Rubric.SAFETY)
    config = LlmJudgeChecker.model_validate(
        {"provider": "sandbox", "model": model, "rubrics": rubrics} | fields
    )
    return LlmJudge(config, providers)


async def verdicts_of(checker: LlmJudge | Moderation, item: CheckItem) -> dict[str, Outcome]:
    await checker.start()
    try:
        return {v.flag: v.outcome for v in await checker.check(item)}
    finally:
        await checker.aclose()


async def test_the_judge_is_right_on_clear_cases(providers: ProvidersFile) -> None:
    checker = judge(providers)
    await checker.start()
    try:
        wrong = {v.flag: v for v in await checker.check(HALLUCINATED)}
        right = {v.flag: v for v in await checker.check(GROUNDED)}
        context = {v.flag: v for v in await checker.check(AGAINST_CONTEXT)}
        unsafe = {v.flag: v for v in await checker.check(UNSAFE)}
        refused = {v.flag: v for v in await checker.check(REFUSED)}
    finally:
        await checker.aclose()
    assert wrong["hallucination"].outcome is Outcome.FLAGGED
    assert wrong["hallucination"].label == "hallucinated"
    assert "paris" in wrong["hallucination"].reason.lower()
    assert right["hallucination"].outcome is Outcome.PASSED
    assert context["hallucination"].outcome is Outcome.PASSED
    assert unsafe["unsafe"].outcome is Outcome.FLAGGED
    assert refused["unsafe"].outcome is Outcome.PASSED
    assert right["irrelevant"].outcome is Outcome.PASSED
    for verdict in wrong.values():  # provenance and cost on every verdict
        assert verdict.checker == "llm_judge"
        assert verdict.model == FAST and verdict.rubric_version == "v1"
        assert 0 <= (verdict.confidence or -1) <= 1
        assert verdict.cost_usd > 0  # the sandbox's usage x the entry's price


async def test_a_context_that_contradicts_the_references_wins(providers: ProvidersFile) -> None:
    """Groundedness is against the context the request carried, not the judge's own facts."""
    item = CheckItem(
        "r-6",
        "What is the capital of France?",
        "The capital of France is Paris.",
        "In this alternate-history game, the capital of France is Lyon.",
    )
    assert (await verdicts_of(judge(providers), item))["hallucination"] is Outcome.FLAGGED


async def test_judge_garbage_is_unchecked_never_passed(providers: ProvidersFile) -> None:
    checker = judge(providers, f"{FAST},garbage=1")
    await checker.start()
    try:
        found = [v for item in (HALLUCINATED, GROUNDED, UNSAFE) for v in await checker.check(item)]
    finally:
        await checker.aclose()
    assert len(found) == 9
    assert all(v.outcome is Outcome.UNCHECKED for v in found)
    assert all(v.raised is None for v in found)
    assert all("unparseable verdict" in v.reason for v in found)


async def test_judge_timeout_is_unchecked_within_the_timeout(providers: ProvidersFile) -> None:
    checker = judge(providers, "sandbox-judge@latency_ms=3000,sigma=0", timeout_s=0.4)
    started = time.perf_counter()
    outcomes = await verdicts_of(checker, HALLUCINATED)
    elapsed = time.perf_counter() - started
    assert set(outcomes.values()) == {Outcome.UNCHECKED}
    assert elapsed < 1.5, elapsed


async def test_judge_server_errors_are_unchecked(providers: ProvidersFile) -> None:
    checker = judge(providers, f"{FAST},error_rate=1", max_retries=1)
    await checker.start()
    try:
        found = list(await checker.check(HALLUCINATED))
    finally:
        await checker.aclose()
    assert {v.outcome for v in found} == {Outcome.UNCHECKED}
    assert all("judge failed" in v.reason and "HTTP 500" in v.reason for v in found)


async def test_an_unknown_judge_model_is_unchecked_with_the_providers_words(
    providers: ProvidersFile,
) -> None:
    found = await verdicts_of(judge(providers, "no-such-judge"), HALLUCINATED)
    assert set(found.values()) == {Outcome.UNCHECKED}


async def test_moderation_flags_with_categories(providers: ProvidersFile) -> None:
    checker = Moderation(ModerationChecker(provider="sandbox"), providers)
    await checker.start()
    try:
        unsafe = (await checker.check(UNSAFE))[0]
        refused = (await checker.check(REFUSED))[0]
        benign = (await checker.check(GROUNDED))[0]
    finally:
        await checker.aclose()
    assert unsafe.outcome is Outcome.FLAGGED and "violence" in unsafe.categories
    assert refused.outcome is Outcome.PASSED and refused.categories == ()
    assert benign.outcome is Outcome.PASSED


async def test_moderation_errors_are_unchecked(providers: ProvidersFile) -> None:
    config = ModerationChecker(provider="sandbox", model="sandbox-moderation@error_rate=1")
    found = await verdicts_of(Moderation(config, providers), UNSAFE)
    assert found == {"unsafe": Outcome.UNCHECKED}


async def test_embeddings_are_deterministic_unit_vectors(providers: ProvidersFile) -> None:
    entry = providers.providers["sandbox"]
    async with ProviderClient.for_provider("sandbox", entry) as client:
        texts = ["the capital of France is Paris", "Paris is the capital of France", "bananas"]
        payload = {"model": "sandbox-embedding", "input": texts}
        _, first, _ = await client.post("/embeddings", payload)
        _, again, _ = await client.post("/embeddings", payload)
    assert first == again
    import json

    vectors = [row["embedding"] for row in json.loads(first)["data"]]
    assert all(math.isclose(sum(x * x for x in v), 1.0, abs_tol=1e-4) for v in vectors)

    def cosine(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert cosine(vectors[0], vectors[1]) > 0.99 > cosine(vectors[0], vectors[2])


async def test_the_pipeline_runs_the_default_kinds_and_counts(providers: ProvidersFile) -> None:
    configs = [
        LlmJudgeChecker(provider="sandbox", model=FAST),
        ModerationChecker(provider="sandbox"),
        PatternsChecker(),
    ]
    results: list[CheckResult] = []
    async with CheckerPipeline(build_checkers(configs, providers), results.append) as pipeline:
        for item in (HALLUCINATED, GROUNDED, UNSAFE, REFUSED):
            assert pipeline.submit(item) == 3
        await pipeline.join()
    by = {(r.item.request_id, r.checker): r.flags() for r in results}
    assert by[("r-1", "llm_judge")]["hallucination"] is True
    assert by[("r-4", "moderation")]["unsafe"] is True
    assert by[("r-5", "patterns")]["refusal"] is True
    assert pipeline.snapshot()["llm_judge"] == {
        "judged": 4, "skipped": 0, "failed": 0, "dropped": 0, "over_budget": 0
    }  # fmt: skip


async def test_garbage_counts_as_failed_in_the_pipeline(providers: ProvidersFile) -> None:
    results: list[CheckResult] = []
    checker = judge(providers, f"{FAST},garbage=1")
    async with CheckerPipeline([checker], results.append) as pipeline:
        for n in range(5):
            pipeline.submit(CheckItem(f"g-{n}", HALLUCINATED.question, HALLUCINATED.answer))
        await pipeline.join()
    assert pipeline.snapshot()["llm_judge"]["failed"] == 5
    assert pipeline.snapshot()["llm_judge"]["judged"] == 0
    assert all(r.unchecked for r in results)


async def test_calls_per_minute_exhausted_falls_back_and_counts(providers: ProvidersFile) -> None:
    budget = CheckerBudget(calls_per_min=5, fallback_sample_rate=0.0)
    checker = judge(providers, budget=budget)
    async with CheckerPipeline([checker], lambda r: None, seed=1) as pipeline:
        taken = sum(pipeline.submit(CheckItem(f"b-{n}", "q", "a")) for n in range(30))
        await pipeline.join()
    counts = pipeline.snapshot()["llm_judge"]
    assert taken == 5
    assert counts["judged"] == 5 and counts["over_budget"] == 25


async def test_dollars_per_hour_exhausted_lowers_the_sample_rate(providers: ProvidersFile) -> None:
    budget = CheckerBudget(usd_per_hour=1e-6, fallback_sample_rate=0.25)
    checker = judge(providers, budget=budget, rubrics=[Rubric.SAFETY])
    async with CheckerPipeline([checker], lambda r: None, seed=7) as pipeline:
        pipeline.submit(UNSAFE)
        await pipeline.join()  # the first answer's cost uses the whole budget
        assert pipeline.spent_usd()["llm_judge"] > 1e-6
        taken = sum(pipeline.submit(CheckItem(f"d-{n}", "q", "a")) for n in range(400))
        await pipeline.join()
    counts = pipeline.snapshot()["llm_judge"]
    assert counts["over_budget"] == 400 - taken
    assert 60 < taken < 140  # a quarter of 400, give or take (seeded)
    assert counts["judged"] == 1 + taken


async def test_a_full_queue_drops_counts_and_never_waits(providers: ProvidersFile) -> None:
    checker = judge(providers, "sandbox-judge@latency_ms=500,sigma=0", rubrics=[Rubric.SAFETY])
    pipeline = CheckerPipeline([checker], lambda r: None, queue_size=2, workers=1)
    await pipeline.start()
    try:
        started = time.perf_counter()
        taken = sum(pipeline.submit(CheckItem(f"q-{n}", "q", "a")) for n in range(200))
        submit_s = time.perf_counter() - started
        await asyncio.sleep(0)
    finally:
        await pipeline.aclose()
    counts = pipeline.snapshot()["llm_judge"]
    assert taken == 2 and counts["dropped"] == 198
    assert submit_s < 0.05, submit_s  # 200 submits, no waiting on the judge
