"""Registry steps: publish the candidate, then promote it or mark it rolled back."""

from __future__ import annotations

from prefect import task

from canaryflow import connections, runbook
from canaryflow.contracts import Endpoints, PublishedVersion, ReleaseSpec
from tasks.common import RETRY_DELAYS, retry_if_transient


@task(retries=3, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=retry_if_transient)
def publish_candidate(spec: ReleaseSpec, endpoints: Endpoints) -> PublishedVersion:
    """Idempotent on the manifest digest; the version becomes the `challenger`."""
    return runbook.publish(spec, endpoints)


@task(retries=3, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=retry_if_transient)
def promote_candidate(service: str, version: str, endpoints: Endpoints) -> str | None:
    """`champion` moves to the candidate; the old champion stays as `last-stable`."""
    return connections.registry(endpoints.mlflow_uri).promote(service, version)


@task(retries=3, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=retry_if_transient)
def mark_rolled_back(service: str, version: str, reason: str, endpoints: Endpoints) -> None:
    connections.registry(endpoints.mlflow_uri).rollback(service, version, reason)


@task(retries=3, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=retry_if_transient)
def set_status(service: str, version: str, status: str, endpoints: Endpoints) -> None:
    connections.registry(endpoints.mlflow_uri).set_status(service, version, status)  # type: ignore[arg-type]


@task(retries=3, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=retry_if_transient)
def retire_challenger(service: str, reason: str, endpoints: Endpoints) -> str | None:
    """The candidate a silent canary left behind: marked rolled back, `challenger` removed.
    Returns its version, or None when no version is challenging."""
    registry = connections.registry(endpoints.mlflow_uri)
    challenger = registry.aliases(service).get("challenger")
    if challenger is not None:
        registry.rollback(service, challenger, reason)
    return challenger
