"""Offline evaluation: the gate's decision rule on literal counts, then whole runs against the
real sandbox provider (started once for this module)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from canaryflow.contracts import (
    Decision,
    DecodingParameters,
    Label,
    ModelManifest,
    OfflineGate,
    Origin,
    Price,
    SuiteComparison,
)
from canaryflow.errors import BudgetExceeded
from canaryflow.evaluation.compare import compare_suite, decide
from canaryflow.evaluation.harness import ERROR_PREFIX, evaluate
from canaryflow.evaluation.suites import Suite, load_suite, stratified_sample
from canaryflow.local.processes import ManagedProcess, free_port, http_ok
from canaryflow.providers.cache import ResponseCache
from canaryflow.providers.client import Budget, ProviderClient
from canaryflow.stats.proportions import items_to_show_non_inferiority

FAST = "@latency_ms=1,sigma=0"
# The shipped suites hold 1,400 items each; runs against the sandbox ask a stratified sample of
# each (as the demo does), which keeps this module at a few seconds.
SAMPLE = 150
REPO = Path(__file__).resolve().parents[2]


def pairs(both: int, only_base: int, only_cand: int, neither: int) -> list[tuple[bool, bool]]:
    return (
        [(True, True)] * both
        + [(True, False)] * only_base
        + [(False, True)] * only_cand
        + [(False, False)] * neither
    )


# --------------------------------------------------------------------------- decision rule


def test_clear_regression_fails_with_a_readable_reason() -> None:
    result = compare_suite("golden", pairs(84, 13, 0, 3), OfflineGate())
    assert (result.baseline_pass, result.candidate_pass) == (97, 84)
    assert (result.only_baseline, result.only_candidate) == (13, 0)
    assert result.result.label is Label.FAIL
    assert result.result.reason.startswith(
        "golden: candidate 84.0% vs baseline 97.0% (diff -13.0 pts, 95% CI [-21."
    )
    assert (
        "McNemar p=0.0002: regression beyond the 3.5-pt margin: the whole interval is below it; "
        "n=100, 3.5-pt margin, 80% power against a drop of 10.9 pts (15.0% discordance assumed, "
        "13.0% observed)"
    ) in result.result.reason
    evidence = result.result.evidence
    assert evidence.threshold == -0.035 and evidence.n_candidate == 100
    assert evidence.detail["detectable_drop"] == pytest.approx(0.1085, abs=5e-4)
    assert evidence.estimate == -0.13
    assert evidence.ci_low is not None and evidence.ci_low < -0.13
    assert evidence.p_value == pytest.approx(2 / 2**13)


def test_identical_answers_pass() -> None:
    result = compare_suite("golden", pairs(90, 0, 0, 10), OfflineGate(margins={}))
    assert result.result.label is Label.PASS
    assert result.diff == 0.0 and result.mcnemar_p == 1.0
    assert result.diff_ci[0] > -0.05
    assert "non-inferior within the 5-pt margin" in result.result.reason


def test_small_significant_regression_within_margin_passes() -> None:
    result = compare_suite("golden", pairs(1800, 40, 10, 150), OfflineGate())
    assert result.mcnemar_p < 0.05 and result.diff_ci[0] > -0.05
    assert result.result.label is Label.PASS


def test_uncertain_result_asks_for_review() -> None:
    result = compare_suite("regression", pairs(30, 3, 1, 6), OfflineGate())
    assert result.diff == pytest.approx(-0.05) and result.diff_ci[0] < -0.05
    assert result.result.label is Label.REVIEW
    assert "inconclusive" in result.result.reason


def test_significant_regression_whose_interval_crosses_the_margin_fails() -> None:
    result = compare_suite("golden", pairs(170, 9, 0, 21), OfflineGate())
    assert result.diff == pytest.approx(-0.045) and result.mcnemar_p < 0.05
    assert result.diff_ci[0] < -0.035 < result.diff_ci[1]
    assert result.result.label is Label.FAIL
    assert "significantly worse (McNemar p < 0.05) with the estimate past" in result.result.reason


def test_significant_regression_within_the_margin_is_reviewed_not_failed() -> None:
    """Worse than baseline, but not shown worse than the margin allows: a human decides."""
    result = compare_suite("golden", pairs(170, 9, 0, 21), OfflineGate(margins={}))
    assert result.mcnemar_p < 0.05 and result.diff > -0.05 > result.diff_ci[0]
    assert result.result.label is Label.REVIEW


def test_estimate_past_the_margin_without_significance_is_reviewed_not_failed() -> None:
    """The rule this replaced failed on the estimate alone, with an interval reaching above 0."""
    result = compare_suite("golden", pairs(85, 8, 2, 5), OfflineGate(margins={}))
    assert result.diff == pytest.approx(-0.06) and result.mcnemar_p > 0.05
    assert result.diff_ci[1] > 0
    assert result.result.label is Label.REVIEW
    assert "straddles the 5-pt margin and the candidate is not shown worse" in (
        result.result.reason
    )


def test_identical_answers_on_a_small_suite_ask_for_review_and_say_why() -> None:
    plain = OfflineGate(margins={})  # the 5-point margin everywhere, no per-suite override
    result = compare_suite("safety", pairs(56, 0, 0, 4), plain)
    assert result.result.label is Label.REVIEW
    assert "with 60 items (it takes 73) even identical answers" in result.result.reason


def test_too_few_items_is_nodata_and_inconclusive() -> None:
    result = compare_suite("safety", pairs(10, 0, 0, 0), OfflineGate(min_items=20))
    assert result.result.label is Label.NODATA
    assert "only 10 paired items" in result.result.reason
    assert decide([result]) is Decision.INCONCLUSIVE


def test_per_suite_margin_applies() -> None:
    gate = OfflineGate(margins={"safety": 0.0})
    result = compare_suite("safety", pairs(95, 1, 0, 4), gate)
    assert result.margin == 0.0 and result.result.evidence.threshold == 0.0
    assert result.result.label is not Label.PASS


def test_decide_fails_on_any_hard_failure_and_never_passes_on_nothing() -> None:
    good = compare_suite("a", pairs(100, 0, 0, 0), OfflineGate())
    bad = compare_suite("b", pairs(80, 20, 0, 0), OfflineGate())
    assert decide([good]) is Decision.PASS
    assert decide([good, bad]) is Decision.FAIL
    assert decide([]) is Decision.INCONCLUSIVE


# --------------------------------------------------------------------------- against the sandbox


@pytest.fixture(scope="module")
def sandbox_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = ManagedProcess(
        name="sandbox",
        command=[
            sys.executable,
            "-m",
            "canaryflow.sandbox",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        log_path=tmp_path_factory.mktemp("sandbox") / "sandbox.log",
        ready=http_ok(f"{url}/health"),
        cwd=REPO,
    ).start(timeout_s=30)
    try:
        yield url
    finally:
        process.stop()


@pytest.fixture(scope="module")
def suites() -> list[Suite]:
    """A stratified SAMPLE of each shipped suite, the harness's own sampling."""
    chosen = []
    for name in ("golden", "regression", "safety"):
        suite = load_suite(name)
        items = tuple(stratified_sample(suite.items, SAMPLE, seed=0))
        chosen.append(suite.model_copy(update={"items": items}))
    return chosen


def manifest(model: str, version: str = "1.0") -> ModelManifest:
    return ModelManifest(
        model_id=f"eval-app/{model.split('@')[0]}-v{version}+ds-1",
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
        origin=Origin(provider="sandbox", model=model),
        prompt_template="{input}",
        # A fixed seed makes the sandbox's answers a function of the prompt: reruns are paired.
        parameters=DecodingParameters(seed=7),
        tokenizer_version="tok-1",
        embedding_version="emb-1",
        license="apache-2.0",
        price=Price(input_per_1k=0.001, output_per_1k=0.002),
    )


def by_suite(report_suites: tuple[SuiteComparison, ...]) -> dict[str, Label]:
    return {s.suite: s.result.label for s in report_suites}


async def test_identical_candidate_passes_every_suite(
    sandbox_url: str, suites: list[Suite]
) -> None:
    seen: list[tuple[int, int]] = []
    async with ProviderClient(sandbox_url) as client:
        report = await evaluate(
            manifest(f"sandbox-base{FAST}", "1.1"),
            manifest(f"sandbox-base{FAST}"),
            suites,
            client,
            OfflineGate(margins={}),  # 5 points on every suite, whatever its size
            progress=lambda done, total: seen.append((done, total)),
        )
    # Identical answers show non-inferiority only on a suite large enough for the margin (73
    # items at 5 pts); smaller suites would be sent to review with that reason.
    needed = items_to_show_non_inferiority(0.05)
    assert needed is not None
    assert by_suite(report.suites) == {
        s.name: Label.PASS if len(s) >= needed else Label.REVIEW for s in suites
    }
    assert all(s.diff == 0 and s.only_baseline == s.only_candidate == 0 for s in report.suites)
    total = 2 * sum(len(s) for s in suites)
    assert seen[-1] == (total, total) and len(seen) == total
    assert len(report.items) == total // 2
    assert report.tokens > 0 and report.cost_usd > 0 and report.cached == 0


async def test_identical_candidate_passes_every_suite_with_the_shipped_margins(
    sandbox_url: str, suites: list[Suite]
) -> None:
    gate = OfflineGate()  # 3.5 pts on the shipped suites: 150 identical answers show it
    async with ProviderClient(sandbox_url) as client:
        report = await evaluate(
            manifest(f"sandbox-base{FAST}", "1.1"),
            manifest(f"sandbox-base{FAST}"),
            suites,
            client,
            gate,
        )
    assert by_suite(report.suites) == {s.name: Label.PASS for s in suites}
    assert report.decision is Decision.PASS


async def test_hallucinating_candidate_fails_golden(sandbox_url: str, suites: list[Suite]) -> None:
    async with ProviderClient(sandbox_url) as client:
        report = await evaluate(
            manifest(f"sandbox-hallucinating{FAST}", "1.1"),
            manifest(f"sandbox-base{FAST}"),
            suites,
            client,
            OfflineGate(),
        )
    golden = next(s for s in report.suites if s.suite == "golden")
    assert golden.result.label is Label.FAIL, golden.result.reason
    assert golden.only_baseline > golden.only_candidate
    assert report.decision is Decision.FAIL


async def test_injectable_candidate_fails_safety(sandbox_url: str, suites: list[Suite]) -> None:
    async with ProviderClient(sandbox_url) as client:
        report = await evaluate(
            manifest(f"sandbox-injectable{FAST}", "1.1"),
            manifest(f"sandbox-base{FAST}"),
            suites,
            client,
            OfflineGate(),
        )
    safety = next(s for s in report.suites if s.suite == "safety")
    assert safety.result.label is Label.FAIL, safety.result.reason
    assert report.decision is Decision.FAIL


async def test_provider_errors_fail_items_without_stopping_the_run(
    sandbox_url: str, suites: list[Suite]
) -> None:
    flaky = manifest("sandbox-base@latency_ms=1,sigma=0,error_rate=0.3", "1.1")
    async with ProviderClient(sandbox_url, max_retries=0) as client:
        report = await evaluate(
            flaky, manifest(f"sandbox-base{FAST}"), suites[:1], client, OfflineGate()
        )
    errors = [i for i in report.items if i.candidate_output.startswith(ERROR_PREFIX)]
    assert errors, "expected some candidate calls to fail at a 30% error rate"
    assert all(not i.candidate_passed for i in errors)
    assert "HTTP 5" in errors[0].candidate_output
    assert len(report.items) == len(suites[0])


async def test_budget_stops_the_run(sandbox_url: str, suites: list[Suite]) -> None:
    budget = Budget(max_tokens=2_000)
    async with ProviderClient(sandbox_url, budget=budget) as client:
        with pytest.raises(BudgetExceeded, match="token budget of 2,000"):
            await evaluate(
                manifest(f"sandbox-base{FAST}", "1.1"),
                manifest(f"sandbox-base{FAST}"),
                suites,
                client,
                OfflineGate(),
            )
    assert budget.spent_tokens <= 2_000


async def test_sampled_rerun_is_replayed_from_cache(
    sandbox_url: str, suites: list[Suite], tmp_path: Path
) -> None:
    cache = ResponseCache(tmp_path / "answers.sqlite")
    candidate, baseline = manifest(f"sandbox-base{FAST}", "1.1"), manifest(f"sandbox-base{FAST}")
    async with ProviderClient(sandbox_url, cache=cache) as client:
        first = await evaluate(
            candidate, baseline, suites, client, OfflineGate(min_items=5), sample_per_suite=10
        )
        second = await evaluate(
            candidate, baseline, suites, client, OfflineGate(min_items=5), sample_per_suite=10
        )
    assert first.cached == 0
    assert second.cached == 2 * len(second.items) == 2 * len(first.items)
    assert second.tokens == 0 and second.cost_usd == 0.0
    assert [i.candidate_output for i in second.items] == [i.candidate_output for i in first.items]
    cache.close()
