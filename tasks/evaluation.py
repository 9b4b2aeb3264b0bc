"""Offline evaluation: candidate and champion answer the same suites; paired statistics decide."""

from __future__ import annotations

from pathlib import Path

from prefect.artifacts import create_markdown_artifact

from canaryflow import connections, reports, runbook
from canaryflow.contracts import Endpoints, EvalReport, PublishedVersion, ReleaseSpec
from canaryflow.loading import load_policy
from canaryflow.registry.conventions import logged_model_id
from canaryflow.settings import Settings
from tasks.common import artifact_key, step

NIGHTLY_SUITES = ["golden", "regression", "safety"]
DEFAULT_POLICY = Path(__file__).resolve().parents[1] / "deployments" / "policies" / "default.yaml"


@step()
def evaluate_candidate(
    spec: ReleaseSpec,
    candidate: PublishedVersion,
    baseline: PublishedVersion,
    endpoints: Endpoints,
    ledger_run_id: str | None = None,
) -> EvalReport:
    """Through the worker's providers file; the report goes to the ledger (its rates also on the
    candidate's LoggedModel), the version's eval URI points at it."""
    providers = Settings().providers(endpoints)
    report = runbook.evaluate_offline(spec, baseline, endpoints, providers=providers)
    markdown = reports.eval_markdown(report)
    create_markdown_artifact(
        key=artifact_key("offline-eval", spec.service),
        markdown=markdown,
        description=f"offline gate for v{candidate.version}: {report.decision.value}",
    )
    registry = connections.registry(endpoints.mlflow_uri)
    eval_uri = ""
    if ledger_run_id is not None:
        ledger = connections.ledger(endpoints.mlflow_uri)
        ledger.log_json(ledger_run_id, "offline_eval", report.model_dump(mode="json"))
        ledger.log_offline_results(ledger_run_id, report, logged_model_id(candidate))
        eval_uri = f"runs:/{ledger_run_id}/offline_eval.json"
    registry.set_tags(
        spec.service,
        candidate.version,
        {"canaryflow.eval_decision": report.decision.value, "canaryflow.eval_uri": eval_uri},
    )
    return report


@step()
def evaluate_champion(
    champion: PublishedVersion, reference: PublishedVersion, endpoints: Endpoints
) -> EvalReport:
    """The nightly check: today's champion against its reference on the whole corpus, through
    the worker's providers file."""
    report = runbook.evaluate_manifests(
        champion.signed.manifest,
        reference.signed.manifest,
        NIGHTLY_SUITES,
        load_policy(DEFAULT_POLICY).offline,
        endpoints,
        providers=Settings().providers(endpoints),
    )
    create_markdown_artifact(
        key=artifact_key("nightly-eval", champion.service),
        markdown=reports.eval_markdown(report),
        description=f"nightly evaluation of {champion.service} v{champion.version} "
        f"against v{reference.version}: {report.decision.value}",
    )
    return report
