"""Release ledger steps: every stage's outcome goes to MLflow and to Prefect's event stream."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from canaryflow import connections, forensics
from canaryflow.contracts import (
    Endpoints,
    EvalReport,
    PublishedVersion,
    ReleaseRecord,
    ReleaseSpec,
    StageOutcome,
    WindowResult,
)
from canaryflow.registry.ledger import NightlyRun
from canaryflow.runbook import TrafficRollback
from tasks.common import emit, step


@step()
def open_ledger(record: ReleaseRecord, spec: ReleaseSpec, endpoints: Endpoints) -> str:
    return connections.ledger(endpoints.mlflow_uri).start(record, spec.model_dump(mode="json"))


@step()
def record_stage(record: ReleaseRecord, outcome: StageOutcome, endpoints: Endpoints) -> None:
    """The caller keeps `record.stages`; tasks never mutate their arguments."""
    if record.ledger_run_id is not None:
        connections.ledger(endpoints.mlflow_uri).log_stage(record.ledger_run_id, outcome)
    emit(
        outcome.key,
        outcome.outcome,
        record.release_id,
        record.service,
        detail=outcome.detail,
        **outcome.metrics,
    )


@step()
def log_evidence(record: ReleaseRecord, name: str, evidence: Any, endpoints: Endpoints) -> None:
    if record.ledger_run_id is not None:
        connections.ledger(endpoints.mlflow_uri).log_json(record.ledger_run_id, name, evidence)


@step()
def close_ledger(record: ReleaseRecord, endpoints: Endpoints) -> None:
    if record.ledger_run_id is not None:
        connections.ledger(endpoints.mlflow_uri).finish(record.ledger_run_id, record)
    emit("release", record.decision, record.release_id, record.service, reason=record.reason)


@step()
def keep_forensics(
    record: ReleaseRecord,
    endpoints: Endpoints,
    *,
    since: datetime,
    change: TrafficRollback,
    windows: list[WindowResult],
) -> None:
    """The post-mortem bundle: window evidence, routes before and after, real requests."""
    assert record.candidate_version is not None
    bundle = forensics.capture(
        endpoints,
        record.service,
        since=since,
        until=datetime.now(UTC),
        candidate_version=record.candidate_version,
        routes_before=change.before,
        routes_after=change.after,
        windows=windows,
        reason=record.reason,
    )
    if record.ledger_run_id is not None:
        connections.ledger(endpoints.mlflow_uri).log_json(record.ledger_run_id, "forensics", bundle)


@step()
def record_nightly(
    champion: PublishedVersion,
    reference: PublishedVersion,
    report: EvalReport,
    endpoints: Endpoints,
    flow_run_id: str,
) -> NightlyRun:
    """One MLflow run per nightly evaluation, tagged with its drift verdict."""
    tags = {"canaryflow.prefect_flow_run_id": flow_run_id}
    return connections.ledger(endpoints.mlflow_uri).record_nightly(
        champion, reference, report, tags=tags
    )
