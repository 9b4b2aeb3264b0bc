"""Nightly evaluation: the champion against `last-stable` on the whole corpus.

A provider can change a model behind the same name; the nightly run catches that drift with the
same paired statistics as the release gate, and keeps the result in the ledger.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from canaryflow import connections, reports, runbook
from canaryflow.contracts import Endpoints, EvalReport
from canaryflow.errors import AliasNotFound
from canaryflow.loading import load_policy
from canaryflow.settings import Settings
from canaryflow.stack import load_endpoints
from tasks.common import RETRY_DELAYS, artifact_key, emit, retry_if_transient

SUITES = ["golden", "regression", "safety"]
POLICY = Path(__file__).resolve().parents[1] / "deployments" / "policies" / "default.yaml"


@task(retries=2, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=retry_if_transient)
def evaluate_champion(service: str, endpoints: Endpoints) -> EvalReport:
    registry = connections.registry(endpoints.mlflow_uri)
    champion = registry.resolve(service, "champion")
    try:
        reference = registry.resolve(service, "last-stable")
    except AliasNotFound:
        reference = champion  # first release: the champion against itself measures drift alone
    return runbook.evaluate_manifests(
        champion.signed.manifest,
        reference.signed.manifest,
        SUITES,
        load_policy(POLICY).offline,
        endpoints,
    )


@flow(name="nightly-eval", log_prints=True)
def nightly_eval(service: str, endpoints: Endpoints | None = None) -> EvalReport:
    endpoints = endpoints or load_endpoints(Settings().home)
    report = evaluate_champion(service, endpoints)
    create_markdown_artifact(
        key=artifact_key("nightly-eval", service),
        markdown=reports.eval_markdown(report),
        description=f"nightly evaluation of {service}: {report.decision.value}",
    )
    emit("nightly_eval", report.decision.value, f"{service}-nightly", service)
    print(f"nightly evaluation of {service}: {report.decision.value}")
    return report
