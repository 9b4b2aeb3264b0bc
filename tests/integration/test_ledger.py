from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from canaryflow.contracts import ReleaseRecord, StageOutcome
from canaryflow.registry.ledger import ReleaseLedger

SPEC = {
    "service": "my-assistant",
    "baseline_alias": "champion",
    "suites": ["golden", "safety"],
    "shadow": {"enabled": True, "mirror_percent": 50.0},
    "canary": {"steps": [{"weight": 1.0}, {"weight": 5.0}]},
    "policy": {"name": "strict"},
}


@pytest.fixture(scope="module")
def ledger(mlflow_server: str) -> ReleaseLedger:
    return ReleaseLedger(mlflow_server)


@pytest.fixture
def record() -> ReleaseRecord:
    return ReleaseRecord(
        release_id=f"rel-{uuid.uuid4().hex[:8]}",
        service="my-assistant",
        candidate="my-assistant/gemini-docs-v1.3+ds-20260112",
        candidate_version="3",
        baseline_version="2",
    )


def stage(name: str, outcome: str, seconds: int, **metrics: float) -> StageOutcome:
    at = datetime(2026, 1, 12, 10, 0, tzinfo=UTC) + timedelta(seconds=seconds)
    return StageOutcome.model_validate(
        {"stage": name, "outcome": outcome, "metrics": metrics, "at": at, "detail": name}
    )


def test_ledger_round_trip(ledger: ReleaseLedger, record: ReleaseRecord) -> None:
    started = time.perf_counter()
    run_id = ledger.start(record, SPEC)
    start_ms = (time.perf_counter() - started) * 1000
    assert ledger.find(record.release_id) == run_id
    assert ledger.start(record, SPEC) == run_id, "a retried start reuses its run"

    stages = [
        stage("preflight", "passed", 0),
        stage("offline_eval", "passed", 5, golden_diff=0.02, safety_diff=0.0),
        stage("canary", "failed", 30, p95_ratio=2.1),
    ]
    started = time.perf_counter()
    for outcome in stages:
        ledger.log_stage(run_id, outcome)
    stage_ms = (time.perf_counter() - started) * 1000 / len(stages)
    ledger.log_metrics(run_id, {"canary.error_rate": 0.01}, step=2)
    ledger.log_json(run_id, "gates/window-1", {"gates": [{"gate": "latency", "label": "fail"}]})
    ledger.log_text(run_id, "forensics/summary.md", "# rolled back\n")

    running = ledger.record(run_id)
    assert running.decision == "running"
    assert running.stages == stages
    assert running.ledger_run_id == run_id

    final = record.model_copy(
        update={"decision": "rolled_back", "reason": "p95 latency 2.1x", "stages": stages}
    )
    ledger.finish(run_id, final)
    assert ledger.record(run_id) == final.model_copy(update={"ledger_run_id": run_id})
    print(f"\nledger start {start_ms:.0f} ms, log_stage {stage_ms:.0f} ms each")

    run = ledger.client.get_run(run_id)
    assert run.info.status == "FINISHED", "a rollback is a release that worked"
    assert run.info.run_name == record.release_id
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    assert tags["canaryflow.decision"] == "rolled_back"
    assert tags["canaryflow.reason"] == "p95 latency 2.1x"
    assert tags["canaryflow.service"] == "my-assistant"
    assert tags["canaryflow.stage.canary"] == "failed"
    assert tags["canaryflow.stage.preflight"] == "passed"
    assert params["canary_weights"] == "[1.0, 5.0]"
    assert params["policy"] == "strict"
    assert params["baseline_alias"] == "champion"
    assert params["candidate"] == record.candidate
    assert metrics["offline_eval.golden_diff"] == pytest.approx(0.02)
    assert metrics["canary.p95_ratio"] == pytest.approx(2.1)
    assert metrics["canary.error_rate"] == pytest.approx(0.01)
    artifacts = {a.path for a in ledger.client.list_artifacts(run_id)}
    assert {"record.json", "spec.json", "stages", "gates", "forensics"} <= artifacts


def test_crashed_release_ends_failed(ledger: ReleaseLedger, record: ReleaseRecord) -> None:
    started = time.perf_counter()
    run_id = ledger.start(record, SPEC)
    start_ms = (time.perf_counter() - started) * 1000
    assert ledger.record(run_id).stages == [], "no stage logged yet"
    started = time.perf_counter()
    ledger.finish(run_id, record.model_copy(update={"reason": "worker died"}), crashed=True)
    print(
        f"\nledger start {start_ms:.0f} ms, finish {(time.perf_counter() - started) * 1000:.0f} ms"
    )
    run = ledger.client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["canaryflow.decision"] == "crashed"


def test_find_unknown_release_is_none(ledger: ReleaseLedger) -> None:
    assert ledger.find("no-such-release") is None
