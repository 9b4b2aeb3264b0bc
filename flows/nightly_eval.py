"""Nightly evaluation: the champion against `last-stable` on the whole corpus.

A provider can change a model behind the same name; the nightly run catches that drift with the
same paired statistics as the release gate, and keeps the result in MLflow
(`canaryflow-nightly/<service>`): a drifted champion is tagged `canaryflow.drift=yes` there and
announced as the event `canaryflow.nightly_eval.drift`.
"""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from canaryflow.contracts import EvalReport
from canaryflow.settings import worker_endpoints
from tasks.common import emit, flush_events, say
from tasks.evaluation import evaluate_champion
from tasks.ledger import record_nightly
from tasks.registry import resolve_champion_and_reference


@flow(name="nightly-eval")
def nightly_eval(service: str) -> EvalReport:
    endpoints = worker_endpoints()
    champion, reference = resolve_champion_and_reference(service, endpoints)
    report = evaluate_champion(champion, reference, endpoints)
    run = record_nightly(champion, reference, report, endpoints, str(flow_run.id or ""))
    outcome = "drift" if run.drift else report.decision.value
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
    say("nightly evaluation of %s: %s (MLflow run %s)", service, outcome, run.run_id)
    return report
