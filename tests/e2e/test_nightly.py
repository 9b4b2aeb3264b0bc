"""The nightly evaluation leaves a run in MLflow that says whether the champion drifted."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from mlflow import MlflowClient

from canaryflow import connections
from canaryflow.contracts import EvalReport
from canaryflow.local import examples
from canaryflow.registry.ledger import NIGHTLY_EXPERIMENT, NIGHTLY_REPORT
from flows.nightly_eval import nightly_eval
from tests.e2e.conftest import LiveStack


def publish_champion(live: LiveStack, service: str, version: str, profile: str) -> str:
    """A service of its own, in the registry only: the nightly run needs no traffic."""
    manifest = examples.manifest(version, profile)
    manifest = manifest.model_copy(
        update={"model_id": manifest.model_id.replace(examples.SERVICE, service, 1)}
    )
    registry = connections.registry(live.endpoints.mlflow_uri)
    published = registry.publish(live.sign(manifest))
    registry.promote(service, published.version)
    return published.version


def nightly_run(live: LiveStack, service: str) -> Any:
    client = MlflowClient(live.endpoints.mlflow_uri)
    experiment = client.get_experiment_by_name(NIGHTLY_EXPERIMENT + service)
    assert experiment is not None, "the nightly run opens an experiment per service"
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])
    assert len(runs) == 1
    return runs[0]


def stored_report(live: LiveStack, run_id: str) -> EvalReport:
    client = MlflowClient(live.endpoints.mlflow_uri)
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run_id, NIGHTLY_REPORT, tmp)
        return EvalReport.model_validate(json.loads(Path(path).read_text()))


def nightly_event_seen(live: LiveStack, service: str, name: str, timeout_s: float = 10) -> bool:
    """Events are sent and stored asynchronously: ask until it shows up or time runs out."""
    query = {
        "filter": {
            "event": {"name": [name]},
            "resource": {"id": [f"canaryflow.release.{service}-nightly"]},
        },
        "limit": 1,
    }
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        url = f"{live.endpoints.prefect_api_url}/events/filter"
        if httpx.post(url, json=query).json()["events"]:
            return True
        time.sleep(0.25)
    return False


def test_nightly_run_logs_params_metrics_tags_and_report(live: LiveStack) -> None:
    service = "nightly-steady"
    version = publish_champion(live, service, "1.0", "sandbox-good")

    report = nightly_eval(service=service, endpoints=live.endpoints)

    run = nightly_run(live, service)
    assert run.info.status == "FINISHED"
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    assert params["champion_version"] == params["reference_version"] == version
    assert params["champion_model_id"].startswith(f"{service}/gemini-docs-v1.0")
    for suite in report.suites:
        assert metrics[f"{suite.suite}.accuracy"] == suite.candidate_rate
        assert metrics[f"{suite.suite}.delta"] == suite.diff
        assert metrics[f"{suite.suite}.p_value"] == suite.mcnemar_p
        assert metrics[f"{suite.suite}.n"] == suite.n
        assert tags[f"canaryflow.suite.{suite.suite}"] == suite.result.label.value
    assert {s.suite for s in report.suites} == {"golden", "regression", "safety"}
    assert tags["canaryflow.decision"] == report.decision.value
    assert tags["canaryflow.drift"] == "no" and tags["canaryflow.drift_suites"] == ""
    assert tags["canaryflow.prefect_flow_run_id"]
    assert stored_report(live, run.info.run_id) == report
    assert nightly_event_seen(live, service, f"canaryflow.nightly_eval.{report.decision.value}")


def test_champion_worse_than_last_stable_is_tagged_and_announced_as_drift(
    live: LiveStack,
) -> None:
    service = "nightly-drifting"
    stable = publish_champion(live, service, "1.0", "sandbox-good")
    drifted = publish_champion(live, service, "1.1", "sandbox-hallucinating")

    report = nightly_eval(service=service, endpoints=live.endpoints)

    assert report.decision.value == "fail"
    run = nightly_run(live, service)
    assert run.data.params["champion_version"] == drifted
    assert run.data.params["reference_version"] == stable
    assert run.data.tags["canaryflow.drift"] == "yes"
    assert "golden" in run.data.tags["canaryflow.drift_suites"].split(",")
    assert run.data.metrics["golden.delta"] < -0.05
    assert nightly_event_seen(live, service, "canaryflow.nightly_eval.drift")
