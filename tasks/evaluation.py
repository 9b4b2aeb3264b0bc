"""Offline evaluation: candidate and champion answer the same suites; paired statistics decide."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact

from canaryflow import connections, reports, runbook
from canaryflow.contracts import Endpoints, EvalReport, PublishedVersion, ReleaseSpec
from tasks.common import RETRY_DELAYS, artifact_key, retry_if_transient


@task(retries=2, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=retry_if_transient)
def evaluate_candidate(
    spec: ReleaseSpec,
    candidate: PublishedVersion,
    baseline: PublishedVersion,
    endpoints: Endpoints,
    ledger_run_id: str | None = None,
) -> EvalReport:
    """The report goes to the ledger; the version's eval URI points at it."""
    report = runbook.evaluate_offline(spec, baseline, endpoints)
    markdown = reports.eval_markdown(report)
    create_markdown_artifact(
        key=artifact_key("offline-eval", spec.service),
        markdown=markdown,
        description=f"offline gate for v{candidate.version}: {report.decision.value}",
    )
    registry = connections.registry(endpoints.mlflow_uri)
    eval_uri = ""
    if ledger_run_id is not None:
        connections.ledger(endpoints.mlflow_uri).log_json(
            ledger_run_id, "offline_eval", report.model_dump(mode="json")
        )
        eval_uri = f"runs:/{ledger_run_id}/offline_eval.json"
    registry.set_tags(
        spec.service,
        candidate.version,
        {"canaryflow.eval_decision": report.decision.value, "canaryflow.eval_uri": eval_uri},
    )
    return report
