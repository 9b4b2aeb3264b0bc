"""Release ledger steps: every stage's outcome goes to MLflow and to Prefect's event stream."""

from __future__ import annotations

from typing import Any

from prefect import task

from canaryflow import connections
from canaryflow.contracts import Endpoints, ReleaseRecord, StageOutcome
from tasks.common import RETRY_DELAYS, emit, retry_if_transient


@task(retries=3, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=retry_if_transient)
def open_ledger(record: ReleaseRecord, spec_json: dict[str, Any], endpoints: Endpoints) -> str:
    return connections.ledger(endpoints.mlflow_uri).start(record, spec_json)


@task(retries=3, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=retry_if_transient)
def record_stage(record: ReleaseRecord, outcome: StageOutcome, endpoints: Endpoints) -> None:
    """The caller keeps `record.stages`; tasks never mutate their arguments."""
    if record.ledger_run_id is not None:
        connections.ledger(endpoints.mlflow_uri).log_stage(record.ledger_run_id, outcome)
    emit(
        outcome.stage,
        outcome.outcome,
        record.release_id,
        record.service,
        detail=outcome.detail,
        **outcome.metrics,
    )


@task(retries=3, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=retry_if_transient)
def log_evidence(record: ReleaseRecord, name: str, evidence: Any, endpoints: Endpoints) -> None:
    if record.ledger_run_id is not None:
        connections.ledger(endpoints.mlflow_uri).log_json(record.ledger_run_id, name, evidence)


@task(retries=3, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=retry_if_transient)
def close_ledger(record: ReleaseRecord, endpoints: Endpoints) -> None:
    if record.ledger_run_id is not None:
        connections.ledger(endpoints.mlflow_uri).finish(record.ledger_run_id, record)
    emit("release", record.decision, record.release_id, record.service, reason=record.reason)
