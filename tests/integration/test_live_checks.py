"""The model service's live checkers over real HTTP: a real sandbox process as the judge and the
moderation endpoint, a real service (uvicorn), a real SQLite store, the gates on what it stored.

A hallucinating version is flagged by the judge; a judge that answers garbage or times out
leaves its records unchecked and the window's quality gates NODATA, naming the judge and why; a
full checker queue drops (counted) and never slows a user; the watermark never passes a record
still waiting for its verdicts.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from canaryflow.analysis.gates import judge_sample
from canaryflow.analysis.sources import StoreSource
from canaryflow.contracts import (
    CheckerConfig,
    Decision,
    Label,
    LiveMetric,
    LlmJudgeChecker,
    PatternsChecker,
)
from canaryflow.dataplane.resolver import CachedResolver
from canaryflow.dataplane.service import ServiceConfig, build_app
from canaryflow.dataplane.store import Store
from canaryflow.loading import load_policy
from tests.integration.test_service import SERVICE, Registry, ServiceUnderTest, running, sandbox
from tests.waiting import wait_for

__all__ = ["sandbox"]

POLICY = load_policy(Path(__file__).resolve().parents[2] / "deployments/policies/default.yaml")
CANARY = {"x-canaryflow-role": "canary", "x-canaryflow-version": "3"}  # always hallucinates
STABLE = {"x-canaryflow-role": "stable", "x-canaryflow-version": "1"}


def judge(model: str, **extra: float) -> LlmJudgeChecker:
    return LlmJudgeChecker(provider="sandbox", model=model, sample_rate=1.0, **extra)  # type: ignore[arg-type]


@contextmanager
def service_with(
    sandbox: str, tmp: Path, checkers: tuple[CheckerConfig, ...], **extra: int
) -> Iterator[tuple[ServiceUnderTest, CollectorRegistry]]:
    store = Store(str(tmp / "records.db"))
    metrics = CollectorRegistry()
    config = ServiceConfig(
        service=SERVICE,
        provider_urls={"sandbox": sandbox},
        default_version="1",
        checkers=checkers,
        flush_every_s=0.05,
        **extra,  # type: ignore[arg-type]
    )
    resolver = CachedResolver(Registry().fetch, ttl_s=60, retry_s=0.05)
    try:
        with running(build_app(config, resolver=resolver, store=store, registry=metrics)) as url:
            yield ServiceUnderTest(url, Registry(), store), metrics
    finally:
        store.close()


def metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return sum(
        sample.value
        for family in registry.collect()
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def send(service: ServiceUnderTest, n: int, headers: dict[str, str]) -> list[float]:
    """n questions the judge can check; each one's latency in seconds."""
    took = []
    for i in range(n):
        started = time.perf_counter()
        r = service.chat(f"What is the capital of France? ({i})", headers)
        took.append(time.perf_counter() - started)
        assert r.status_code == 200, r.text
    return took


def stored(service: ServiceUnderTest, since: datetime, n: int) -> int | None:
    count = service.store.count(SERVICE, since, datetime.now(UTC) + timedelta(seconds=1))
    return count if count >= n else None


def test_a_hallucinating_version_is_flagged_by_the_judge_and_the_gate_fails_it(
    sandbox: str, tmp_path: Path
) -> None:
    checkers = (judge("sandbox-judge"), PatternsChecker())
    with service_with(sandbox, tmp_path, checkers) as (service, _):
        start = datetime.now(UTC) - timedelta(milliseconds=1)
        send(service, 40, STABLE)
        send(service, 40, CANARY)
        wait_for("80 records", lambda: stored(service, start, 80), 15, 0.05)
        end = datetime.now(UTC)
        records = service.store.records(SERVICE, start, end, version="3")
        sample = StoreSource(service.store).window(SERVICE, "1", "3", start, end)
        results, decision, _ = judge_sample(POLICY, sample)
    assert all(r.checked and r.hallucination is True and not r.unchecked for r in records)
    assert all(r.checks == "llm_judge/sandbox-judge/v1=judged;patterns=judged" for r in records)
    gate = next(r for r in results if r.gate == LiveMetric.HALLUCINATION_RATE)
    assert gate.label is Label.FAIL, gate.reason
    assert gate.evidence.detail["llm_judge/sandbox-judge/v1 judged"] == 40
    assert gate.evidence.detail["llm_judge/sandbox-judge/v1 failed"] == 0
    assert decision is Decision.FAIL


@pytest.mark.parametrize(
    ("checker", "why"),
    [
        (judge("sandbox-judge@garbage=1"), "unparseable verdict"),
        # Four workers at 0.3 s each: the later items wait in the queue past the hold.
        (judge("sandbox-judge@latency_ms=3000,sigma=0", timeout_s=0.3), "timed out|no result"),
    ],
    ids=["garbage", "timeout"],
)
def test_a_failing_judge_leaves_records_unchecked_and_the_window_without_data(
    sandbox: str, tmp_path: Path, checker: LlmJudgeChecker, why: str
) -> None:
    with service_with(sandbox, tmp_path, (checker,)) as (service, registry):
        start = datetime.now(UTC) - timedelta(milliseconds=1)
        send(service, 35, STABLE)
        send(service, 35, CANARY)
        wait_for("70 records", lambda: stored(service, start, 70), 20, 0.05)
        end = datetime.now(UTC)
        records = service.store.records(SERVICE, start, end)
        sample = StoreSource(service.store).window(SERVICE, "1", "3", start, end)
        results, decision, _ = judge_sample(POLICY, sample)
        label = f"llm_judge/{checker.model}/v1"
        failed = metric(registry, "canaryflow_checker_items_total", checker=label, outcome="failed")
    assert all(r.unchecked and not r.checked and r.hallucination is None for r in records)
    assert all(r.checks.startswith(f"{label}=failed(") for r in records)
    gate = next(r for r in results if r.gate == LiveMetric.HALLUCINATION_RATE)
    assert gate.label is Label.NODATA
    assert f"{label}: 0 judged, 35 failed (" in gate.reason, gate.reason
    assert any(w in gate.reason for w in why.split("|")), gate.reason
    assert decision is Decision.INCONCLUSIVE  # never a pass: the release is not promoted
    assert failed == 70


def test_a_full_checker_queue_drops_counted_and_users_do_not_wait(
    sandbox: str, tmp_path: Path
) -> None:
    slow = judge("sandbox-judge@latency_ms=1500,sigma=0", timeout_s=5)
    with service_with(sandbox, tmp_path, (slow,), check_queue_size=1) as (service, registry):
        start = datetime.now(UTC) - timedelta(milliseconds=1)
        took = send(service, 30, STABLE)
        wait_for("30 records", lambda: stored(service, start, 30), 20, 0.05)
        records = service.store.records(SERVICE, start, datetime.now(UTC) + timedelta(seconds=1))
        label = "llm_judge/sandbox-judge@latency_ms=1500,sigma=0/v1"
        dropped = metric(registry, "canaryflow_checker_items_total", outcome="dropped")
    print(
        f"FIGURE queue of 1, judge 1.5 s: user p-max {max(took) * 1000:.0f} ms, {dropped:g} dropped"
    )
    drops = [r for r in records if r.checks == f"{label}=dropped"]
    assert dropped >= 20 and len(drops) == dropped
    assert all(r.unchecked and not r.checked for r in drops)
    assert sum(r.checks == f"{label}=judged" for r in records) >= 1
    assert max(took) < 0.5  # the judge takes 1.5 s a verdict; no user waited for one


def test_the_watermark_never_passes_a_record_waiting_for_its_verdicts(
    sandbox: str, tmp_path: Path
) -> None:
    slow = judge("sandbox-judge@latency_ms=2000,sigma=0", timeout_s=5)
    with service_with(sandbox, tmp_path, (slow,)) as (service, _):
        watermarks = service.store.watermarks
        send(service, 1, STABLE)
        answered = time.time()
        time.sleep(1.0)  # the worker has marked several times while idle meanwhile
        held_mark = watermarks.lowest(SERVICE, alive_since=answered - 60)
        in_store = service.store.count(SERVICE, datetime.now(UTC) - timedelta(minutes=1),
                                       datetime.now(UTC))  # fmt: skip
        wait_for("the record", lambda: stored(service, datetime.now(UTC) - timedelta(minutes=1), 1),
                 10, 0.05)  # fmt: skip
        record = service.store.records(
            SERVICE, datetime.now(UTC) - timedelta(minutes=1), datetime.now(UTC)
        )[0]
        wait_for("the mark past it", lambda: (watermarks.lowest(SERVICE, answered - 60) or 0)
                 > answered, 5, 0.05)  # fmt: skip
    assert in_store == 0  # held for its verdict
    assert held_mark is not None and held_mark <= record.at.timestamp() <= answered
    assert record.checked and record.hallucination is False
