"""The model-backed scorers over real HTTP, against the sandbox provider (started once here):
embedding similarity, the pairwise judge asked in both orders, and failures left unscored."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from canaryflow.contracts import DecodingParameters, ModelManifest, OfflineGate, Origin, Price
from canaryflow.errors import ConfigError
from canaryflow.evaluation.harness import evaluate
from canaryflow.evaluation.model_scorers import ModelScorers, cosine
from canaryflow.evaluation.suites import EvalItem, load_suite
from canaryflow.local.processes import ManagedProcess, free_port, http_ok
from canaryflow.providers.client import ProviderClient
from canaryflow.sandbox.judging import embed

REPO = Path(__file__).resolve().parents[2]
QUESTION = "What is the capital of France?"
RIGHT, WRONG = "The capital of France is Paris.", "The capital of France is Lyon."


@pytest.fixture(scope="module")
def sandbox_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = ManagedProcess(
        name="sandbox",
        command=[sys.executable, "-m", "canaryflow.sandbox", "--port", str(port)],
        log_path=tmp_path_factory.mktemp("sandbox") / "sandbox.log",
        ready=http_ok(f"{url}/health"),
        cwd=REPO,
    ).start(timeout_s=30)
    try:
        yield url
    finally:
        process.stop()


def item(scorer: str, expected: dict[str, Any] | None = None, question: str = QUESTION) -> EvalItem:
    return EvalItem.model_validate(
        {"id": "m-1", "suite": "m", "kind": "k", "input": question, "scorer": scorer}
        | {"expected": expected or {}}
    )


# --------------------------------------------------------------------------- similarity


async def test_similarity_passes_close_answers_and_fails_far_ones(sandbox_url: str) -> None:
    reference = "Paris is the capital city of France"
    close, far = "The capital city of France is Paris.", "Bananas grow in warm climates."
    async with ProviderClient(sandbox_url) as client:
        scorers = ModelScorers(embeddings=client, embedding_model="sandbox-embedding")
        base, cand = await scorers.score(
            item("semantic_similarity", {"reference": reference}), far, close
        )
    # The sandbox's vectors are a hashed bag of words, so the expected cosines can be worked
    # out here; matching them shows the vectors came back over HTTP in input order.
    near = cosine(embed(reference), embed(close))
    apart = cosine(embed(reference), embed(far))
    assert near > 0.8 > apart
    assert cand.passed and cand.scored and cand.reason == f"cosine similarity {near:.3f} >= 0.8"
    assert not base.passed and base.scored
    assert base.reason == f"cosine similarity {apart:.3f} < 0.8"


async def test_similarity_threshold_comes_from_the_item(sandbox_url: str) -> None:
    expected = {"reference": "Paris is the capital city of France", "min_similarity": 0.99}
    async with ProviderClient(sandbox_url) as client:
        scorers = ModelScorers(embeddings=client, embedding_model="sandbox-embedding")
        base, cand = await scorers.score(
            item("semantic_similarity", expected), "France capital city is Paris", None
        )
    assert not base.passed and base.scored and base.reason.endswith("< 0.99")
    assert not cand.passed and cand.scored and cand.reason == "no answer"


async def test_failed_embeddings_leave_the_item_unscored(sandbox_url: str) -> None:
    async with ProviderClient(sandbox_url, max_retries=0) as client:
        scorers = ModelScorers(embeddings=client, embedding_model="sandbox-embedding@error_rate=1")
        results = await scorers.score(
            item("semantic_similarity", {"reference": "Paris"}), "Paris", "Paris"
        )
    for result in results:
        assert not result.passed and not result.scored
        assert (
            result.reason.startswith("unscored: /embeddings failed:")
            and "HTTP 500" in result.reason
        )


# --------------------------------------------------------------------------- pairwise judge


async def judged(
    sandbox_url: str, baseline: str | None, candidate: str | None, **options: Any
) -> tuple[Any, Any]:
    model = options.pop("judge_model", "sandbox-judge")
    timeout_s = options.pop("scorer_timeout_s", None)
    async with ProviderClient(sandbox_url, **options) as client:
        scorers = ModelScorers(judge=client, judge_model=model, timeout_s=timeout_s)
        return await scorers.score(item("llm_judge"), baseline, candidate)


async def test_a_win_in_both_orders_passes_the_winner_only(sandbox_url: str) -> None:
    base, cand = await judged(sandbox_url, baseline=WRONG, candidate=RIGHT)
    assert cand.passed and not base.passed and base.scored and cand.scored
    assert cand.reason == (
        "won: the judge chose candidate with the candidate shown first, candidate swapped"
    )
    base, cand = await judged(sandbox_url, baseline=RIGHT, candidate=WRONG)
    assert base.passed and not cand.passed
    assert cand.reason.startswith("lost: the judge chose baseline")


async def test_orders_that_disagree_are_a_tie(sandbox_url: str) -> None:
    """Both right and on topic: the sandbox's judge picks whichever it is shown first, so the
    swapped asking names the other model, and neither wins."""
    base, cand = await judged(
        sandbox_url, baseline=RIGHT, candidate="Paris is the capital of France."
    )
    said = "the judge chose candidate with the candidate shown first, baseline swapped"
    assert base == cand
    assert cand.passed and cand.scored and cand.reason == f"tie: {said}"


async def test_an_answer_beats_no_answer_without_asking(sandbox_url: str) -> None:
    base, cand = await judged(sandbox_url, baseline=None, candidate=WRONG)
    assert not base.passed and base.reason == "no answer"
    assert cand.passed and cand.scored


async def test_a_garbage_verdict_is_unscored_never_a_pass(sandbox_url: str) -> None:
    base, cand = await judged(
        sandbox_url, baseline=WRONG, candidate=RIGHT, judge_model="sandbox-judge@garbage=1"
    )
    for result in (base, cand):
        assert not result.passed and not result.scored
        assert result.reason.startswith("unscored: unparseable verdict")


@pytest.mark.parametrize(
    ("options", "why"),
    [
        ({"timeout_s": 0.3, "max_retries": 0}, "/chat/completions failed: "),
        ({"scorer_timeout_s": 0.3}, "/chat/completions timed out after 0.3 s"),
    ],
)
async def test_a_judge_timeout_is_unscored_never_a_pass(
    sandbox_url: str, options: dict[str, Any], why: str
) -> None:
    slow = "sandbox-judge@latency_ms=3000,sigma=0"
    base, cand = await judged(sandbox_url, WRONG, RIGHT, judge_model=slow, **options)
    for result in (base, cand):
        assert not result.passed and not result.scored
        assert result.reason.startswith(f"unscored: {why}")


# --------------------------------------------------------------------------- in the harness


def manifest(model: str, version: str = "1.0") -> ModelManifest:
    return ModelManifest(
        model_id=f"eval-app/{model.split('@')[0]}-v{version}+ds-1",
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
        origin=Origin(provider="sandbox", model=model),
        prompt_template="{input}",
        parameters=DecodingParameters(seed=7),
        tokenizer_version="tok-1",
        embedding_version="emb-1",
        license="apache-2.0",
        price=Price(input_per_1k=0.001, output_per_1k=0.002),
    )


def mixed_suite(tmp_path: Path) -> Path:
    """Each item names its own scorer: a text scorer, embeddings, the judge."""
    questions = [QUESTION, "What is the capital of Japan?", "What is the capital of Italy?"]
    rows = []
    for i, question in enumerate(questions):
        for scorer, expected in (
            ("reference_fact", {"answer": "Paris"}),
            ("token_f1", {"reference": "Paris", "min_f1": 0.1}),
            ("semantic_similarity", {"reference": question, "min_similarity": 0.1}),
            ("llm_judge", {}),
        ):
            rows.append(
                {"id": f"mix-{scorer}-{i}", "suite": "mixed", "kind": scorer, "input": question}
                | {"scorer": scorer, "expected": expected}
            )
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("judge_model", ["sandbox-judge", "sandbox-judge@garbage=1"])
async def test_the_harness_scores_each_item_by_its_own_scorer(
    sandbox_url: str, tmp_path: Path, judge_model: str
) -> None:
    suite = load_suite(mixed_suite(tmp_path))
    fast = "sandbox-base@latency_ms=1,sigma=0,error_rate=0"
    async with ProviderClient(sandbox_url) as client:
        scorers = ModelScorers(
            embeddings=client,
            embedding_model="sandbox-embedding",
            judge=client,
            judge_model=judge_model,
        )
        report = await evaluate(
            manifest(fast, "1.1"),
            manifest(fast),
            [suite],
            client,
            OfflineGate(),
            scorer_models=scorers,
        )
    by_kind: dict[str, list[Any]] = {}
    for result in report.items:
        by_kind.setdefault(result.kind, []).append(result)
    # Same model, same seed: the same answers. Paris is right for one question of three.
    facts = by_kind["reference_fact"]
    assert [r.candidate_passed for r in facts] == [True, False, False]
    assert all(r.baseline_passed == r.candidate_passed for r in facts)
    assert all(
        r.unscored is None
        for kind in ("reference_fact", "token_f1", "semantic_similarity")
        for r in by_kind[kind]
    )
    assert all(r.candidate_passed for r in by_kind["semantic_similarity"])
    judged_items = by_kind["llm_judge"]
    (mixed,) = report.suites
    if judge_model == "sandbox-judge":
        # The same answer twice is a tie: both pass, the pair counts.
        assert all(r.baseline_passed and r.candidate_passed for r in judged_items)
        assert all(r.unscored is None for r in judged_items)
        assert mixed.n == 12 and "unscored" not in mixed.result.reason
    else:
        assert all(not r.baseline_passed and not r.candidate_passed for r in judged_items)
        assert all(r.unscored and "unparseable verdict" in r.unscored for r in judged_items)
        # Missing evidence is left out of the comparison and said so, not counted as a pass.
        assert mixed.n == 9 and mixed.result.reason.endswith("(3 unscored item(s) left out)")
        assert mixed.result.evidence.detail["unscored"] == 3


async def test_a_model_scorer_without_its_model_is_refused_before_any_call(
    sandbox_url: str, tmp_path: Path
) -> None:
    suite = load_suite(mixed_suite(tmp_path))
    calls: list[tuple[int, int]] = []
    async with ProviderClient(sandbox_url) as client:
        only_embeddings = ModelScorers(embeddings=client, embedding_model="sandbox-embedding")
        with pytest.raises(ConfigError, match="use the llm_judge scorer"):
            await evaluate(
                manifest("sandbox-base", "1.1"),
                manifest("sandbox-base"),
                [suite],
                client,
                OfflineGate(),
                progress=lambda done, total: calls.append((done, total)),
                scorer_models=only_embeddings,
            )
    assert calls == []
