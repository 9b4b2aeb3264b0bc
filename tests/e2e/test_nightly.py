"""The nightly evaluation leaves a run in MLflow that says whether the champion drifted."""

from __future__ import annotations

import json
import tempfile
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
from tests.waiting import wait_for


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


def nightly_events(live: LiveStack, service: str) -> list[str]:
    """Names of the nightly events stored for `service` so far (sent and stored asynchronously)."""
    query = {
        "filter": {
            "event": {"prefix": ["canaryflow.nightly_eval."]},
            "resource": {"id": [f"canaryflow.release.{service}-nightly"]},
        },
        "limit": 10,
    }
    url = f"{live.endpoints.prefect_api_url}/events/filter"
    return [event["event"] for event in httpx.post(url, json=query).json()["events"]]


def nightly_event(live: LiveStack, service: str) -> str:
    """The one nightly event of `service`, once Prefect has stored it."""
    (name,) = wait_for(f"the nightly event of {service}", lambda: nightly_events(live, service), 10)
    return name


def test_champion_against_itself_passes_and_logs_params_metrics_tags_and_report(
    live: LiveStack,
) -> None:
    """Before any second promotion the champion is its own reference: the same seeded answers
    on both sides, so every suite is a pass (each is large enough to show non-inferiority)."""
    service = "nightly-steady"
    version = publish_champion(live, service, "1.0", "sandbox-good")

    report = nightly_eval(service=service)

    assert report.decision.value == "pass", [s.result.reason for s in report.suites]
    assert {s.suite for s in report.suites} == {"golden", "regression", "safety"}
    for suite in report.suites:
        assert (suite.only_baseline, suite.only_candidate, suite.diff) == (0, 0, 0.0), suite.suite
        assert suite.result.label.value == "pass", suite.result.reason
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
        assert tags[f"canaryflow.suite.{suite.suite}"] == "pass"
    assert tags["canaryflow.decision"] == "pass"
    assert tags["canaryflow.drift"] == "no" and tags["canaryflow.drift_suites"] == ""
    assert tags["canaryflow.prefect_flow_run_id"]
    assert stored_report(live, run.info.run_id) == report
    assert nightly_event(live, service) == "canaryflow.nightly_eval.pass"


def test_champion_better_than_last_stable_passes_without_drift(live: LiveStack) -> None:
    """The sandbox's answers share their random draws across profiles: the good champion fails
    a subset of the items the hallucinating last-stable fails, never one it passed."""
    service = "nightly-improved"
    stable = publish_champion(live, service, "1.0", "sandbox-hallucinating")
    better = publish_champion(live, service, "1.1", "sandbox-good")

    report = nightly_eval(service=service)

    assert report.decision.value == "pass", [s.result.reason for s in report.suites]
    assert all(s.only_baseline == 0 for s in report.suites)
    golden = next(s for s in report.suites if s.suite == "golden")
    assert golden.only_candidate > 0 and golden.diff > 0
    run = nightly_run(live, service)
    assert (run.data.params["champion_version"], run.data.params["reference_version"]) == (
        better,
        stable,
    )
    assert run.data.tags["canaryflow.drift"] == "no"
    assert nightly_event(live, service) == "canaryflow.nightly_eval.pass"


def test_champion_worse_than_last_stable_is_tagged_and_announced_as_drift(
    live: LiveStack,
) -> None:
    service = "nightly-drifting"
    stable = publish_champion(live, service, "1.0", "sandbox-good")
    drifted = publish_champion(live, service, "1.1", "sandbox-hallucinating")

    report = nightly_eval(service=service)

    assert report.decision.value == "fail"
    golden = next(s for s in report.suites if s.suite == "golden")
    assert golden.result.label.value == "fail" and golden.only_candidate == 0
    run = nightly_run(live, service)
    assert run.data.params["champion_version"] == drifted
    assert run.data.params["reference_version"] == stable
    assert run.data.tags["canaryflow.drift"] == "yes"
    assert "golden" in run.data.tags["canaryflow.drift_suites"].split(",")
    assert run.data.metrics["golden.delta"] < -0.05
    assert nightly_event(live, service) == "canaryflow.nightly_eval.drift"
