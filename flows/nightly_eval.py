"""Nightly evaluation: the champion against `last-stable` on the whole corpus.

A provider can change a model behind the same name; the nightly run catches that drift with the
same paired statistics as the release gate, and keeps the result in MLflow
(`canaryflow-nightly/<service>`): a drifted champion is tagged `canaryflow.drift=yes` there and
announced as the event `canaryflow.nightly_eval.drift`.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from canaryflow import connections, reports, runbook
from canaryflow.contracts import Endpoints, EvalReport
from canaryflow.errors import AliasNotFound
from canaryflow.loading import load_policy
from canaryflow.registry.ledger import NightlyRun
from canaryflow.contracts import PublishedVersion
from canaryflow.settings import Settings, load_endpoints
from tasks.common import RETRY_DELAYS, artifact_key, emit, flush_events, retry_if_transient

SUITES = ["golden", "regression", "safety"]
POLICY = Path(__file__).resolve().parents[1] / "deployments" / "policies" / "default.yaml"


@task(retries=2, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=retry_if_transient)
def resolve_versions(
    service: str, endpoints: Endpoints
) -> tuple[PublishedVersion, PublishedVersion]:
    """The champion and its reference; before any promotion the champion is its own reference."""
    registry = connections.registry(endpoints.mlflow_uri)
    champion = registry.resolve(service, "champion")
    try:
        reference = registry.resolve(service, "last-stable")
    except AliasNotFound:
        reference = champion  # first release: the champion against itself measures noise alone
    return champion, reference


@task(retries=2, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=retry_if_transient)
def evaluate_champion(
    champion: PublishedVersion, reference: PublishedVersion, endpoints: Endpoints
) -> EvalReport:
    return runbook.evaluate_manifests(
        champion.signed.manifest,
        reference.signed.manifest,
        SUITES,
        load_policy(POLICY).offline,
        endpoints,
    )


@task(retries=3, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=retry_if_transient)
def record_nightly(
    champion: PublishedVersion,
    reference: PublishedVersion,
    report: EvalReport,
    endpoints: Endpoints,
) -> NightlyRun:
    tags = {"canaryflow.prefect_flow_run_id": str(flow_run.id or "")}
    return connections.ledger(endpoints.mlflow_uri).record_nightly(
        champion, reference, report, tags=tags
    )


@flow(name="nightly-eval", log_prints=True)
def nightly_eval(service: str, endpoints: Endpoints | None = None) -> EvalReport:
    endpoints = endpoints or load_endpoints(Settings().home)
    champion, reference = resolve_versions(service, endpoints)
    report = evaluate_champion(champion, reference, endpoints)
    run = record_nightly(champion, reference, report, endpoints)
    outcome = "drift" if run.drift else report.decision.value
    create_markdown_artifact(
        key=artifact_key("nightly-eval", service),
        markdown=reports.eval_markdown(report),
        description=f"nightly evaluation of {service} v{champion.version} "
        f"against v{reference.version}: {outcome}",
    )
    emit(
        "nightly_eval",
        outcome,
        f"{service}-nightly",
        service,
        decision=report.decision.value,
        drift_suites=list(run.drift_suites),
        champion_version=champion.version,
        reference_version=reference.version,
        mlflow_run_id=run.run_id,
    )
    flush_events()  # a deployed run's process exits right after the flow
    print(f"nightly evaluation of {service}: {outcome} (MLflow run {run.run_id})")
    return report
