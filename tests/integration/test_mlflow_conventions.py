"""MLflow 3 conventions on a real server: LoggedModel per version, prompts, linked metrics."""

from __future__ import annotations

import json
import logging
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from canaryflow.contracts import (
    EvalItemResult,
    EvalReport,
    ModelManifest,
    OfflineGate,
    Origin,
    Price,
    SignedManifest,
)
from canaryflow.contracts.verdicts import combine
from canaryflow.errors import RegistryError
from canaryflow.evaluation.compare import compare_suite
from canaryflow.registry.conventions import logged_model_id
from canaryflow.registry.ledger import OFFLINE_ITEMS, ReleaseLedger
from canaryflow.registry.signing import generate_keypair, sign
from canaryflow.registry.versions import EXPERIMENT, MlflowRegistry

TEMPLATE = "Answer briefly: {input}"


def manifest_for(service: str, version: str = "1.0", template: str = TEMPLATE) -> ModelManifest:
    return ModelManifest(
        model_id=f"{service}/gemini-docs-v{version}+ds-20260112",
        created_at=datetime(2026, 1, 12, 9, 30, tzinfo=UTC),
        origin=Origin(provider="sandbox", model="docs-large"),
        prompt_template=template,
        tokenizer_version="tok-3",
        embedding_version="emb-2",
        license="apache-2.0",
        price=Price(input_per_1k=0.1, output_per_1k=0.2),
    )


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_keypair(tmp_path_factory.mktemp("keys"), "ci", ["*"]).private_path


@pytest.fixture(scope="module")
def registry(mlflow_server: str) -> MlflowRegistry:
    return MlflowRegistry(mlflow_server)


@pytest.fixture(scope="module")
def client(mlflow_server: str) -> MlflowClient:
    """A separate client: what a user of the MLflow UI or API would read."""
    return MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)


@pytest.fixture
def service() -> str:
    return f"conv-{uuid.uuid4().hex[:8]}"


def signed(
    service: str, key: Path, version: str = "1.0", template: str = TEMPLATE
) -> SignedManifest:
    return sign(manifest_for(service, version, template), key)


def models_with_digest(client: MlflowClient, digest: str) -> list[Any]:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    return list(
        client.search_logged_models(
            [experiment.experiment_id], filter_string=f"tags.`canaryflow.digest` = '{digest}'"
        )
    )


def test_publish_creates_an_external_logged_model_linked_to_the_version(
    registry: MlflowRegistry, client: MlflowClient, service: str, key: Path
) -> None:
    candidate = signed(service, key)
    published = registry.publish(candidate)
    model_id = logged_model_id(published)
    assert model_id is not None and model_id.startswith("m-")

    version = client.get_model_version(service, published.version)
    assert version.source == f"models:/{model_id}"
    assert version.run_id == published.run_id

    model = client.get_logged_model(model_id)
    assert model.name == service
    assert str(model.status) == "READY"
    assert model.source_run_id == published.run_id
    assert model.tags["mlflow.model.isExternal"] == "true"
    assert model.tags["canaryflow.digest"] == candidate.manifest.digest()
    assert model.params["model_id"] == candidate.manifest.model_id
    assert model.params["provider"] == "sandbox"
    assert model.params["model"] == "docs-large"
    assert model.params["manifest_digest"] == candidate.manifest.digest()
    # The server records the registration on the model: the UI links both ways.
    linked = json.loads(model.tags["mlflow.modelVersions"])
    assert linked == [{"name": service, "version": int(published.version)}]
    # Nothing secret travels with the model: not even the signature.
    assert candidate.signature.value not in json.dumps({**model.tags, **model.params})
    # The manifest is still read back (and its digest checked) through the version.
    assert registry.get(service, published.version).signed == candidate


def test_the_template_is_in_the_prompt_registry_and_linked(
    registry: MlflowRegistry, client: MlflowClient, service: str, key: Path
) -> None:
    candidate = signed(service, key)
    published = registry.publish(candidate)
    uri = published.tags["canaryflow.prompt_uri"]
    assert uri == f"prompts:/{service}-prompt/1"

    prompt = client.load_prompt(uri)
    assert prompt.template == "Answer briefly: {{input}}"
    assert prompt.format(input="what is 2+2?") == candidate.manifest.render("what is 2+2?")
    assert prompt.tags["canaryflow.template_hash"] == candidate.manifest.prompt_template_hash

    model = client.get_logged_model(str(logged_model_id(published)))
    assert json.loads(model.tags["mlflow.linkedPrompts"]) == [
        {"name": f"{service}-prompt", "version": "1"}
    ]


def test_republish_is_idempotent_and_prompts_version_per_template(
    registry: MlflowRegistry, client: MlflowClient, service: str, key: Path
) -> None:
    first_signed = signed(service, key, "1.0")
    first = registry.publish(first_signed)
    again = registry.publish(first_signed)
    assert not again.created and again.version == first.version
    assert logged_model_id(again) == logged_model_id(first)
    assert len(models_with_digest(client, first_signed.manifest.digest())) == 1

    # A new model with the same template: a new version and LoggedModel, the same prompt version.
    same_template = registry.publish(signed(service, key, "1.1"))
    assert same_template.version != first.version
    assert logged_model_id(same_template) != logged_model_id(first)
    assert same_template.tags["canaryflow.prompt_uri"] == f"prompts:/{service}-prompt/1"

    changed = registry.publish(signed(service, key, "1.2", "Answer in French: {input}"))
    assert changed.tags["canaryflow.prompt_uri"] == f"prompts:/{service}-prompt/2"
    assert client.load_prompt(changed.tags["canaryflow.prompt_uri"]).template == (
        "Answer in French: {{input}}"
    )
    # Going back to the first template reuses its prompt version.
    back = registry.publish(signed(service, key, "1.3"))
    assert back.tags["canaryflow.prompt_uri"] == f"prompts:/{service}-prompt/1"
    assert len(client.search_prompt_versions(f"{service}-prompt")) == 2


def test_a_publish_failing_after_the_logged_model_leaves_no_version_and_a_retry_reuses_it(
    registry: MlflowRegistry,
    client: MlflowClient,
    service: str,
    key: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mlflow.exceptions import MlflowException

    candidate = signed(service, key)
    digest = candidate.manifest.digest()

    def refuse(*args: object, **kwargs: object) -> None:
        raise MlflowException("registry refused", error_code="INVALID_PARAMETER_VALUE")

    with monkeypatch.context() as patch:
        patch.setattr(registry.client, "create_model_version", refuse)
        with pytest.raises(RegistryError, match="registry refused"):
            registry.publish(candidate)
    assert client.search_model_versions(f"name = '{service}'") == []
    (orphan,) = models_with_digest(client, digest)

    published = registry.publish(candidate)
    assert published.created
    assert logged_model_id(published) == orphan.model_id
    assert published.run_id == orphan.source_run_id
    assert len(models_with_digest(client, digest)) == 1


def test_without_a_usable_prompt_registry_publish_warns_and_goes_on(
    registry: MlflowRegistry,
    client: MlflowClient,
    service: str,
    key: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client.create_registered_model(f"{service}-prompt")  # a model, not a prompt, holds the name
    with caplog.at_level(logging.WARNING, logger="canaryflow.registry.conventions"):
        published = registry.publish(signed(service, key))
    assert published.created
    assert "canaryflow.prompt_uri" not in published.tags
    assert logged_model_id(published) is not None
    assert "not registered in the MLflow Prompt Registry" in caplog.text
    model = client.get_logged_model(str(logged_model_id(published)))
    assert "mlflow.linkedPrompts" not in model.tags


def report_for(candidate: str, baseline: str) -> EvalReport:
    gate = OfflineGate(min_items=4)
    items = [
        EvalItemResult(
            suite="golden",
            item_id=f"g{i}",
            kind="exact",
            baseline_passed=i != 0,
            candidate_passed=i not in (1, 2),
            baseline_output=f"base {i}",
            candidate_output=f"cand {i}",
        )
        for i in range(8)
    ]
    suite = compare_suite("golden", [(r.baseline_passed, r.candidate_passed) for r in items], gate)
    return EvalReport(
        candidate=candidate,
        baseline=baseline,
        suites=(suite,),
        decision=combine([suite.result]),
        items=tuple(items),
        tokens=1200,
        cost_usd=0.01,
    )


def test_offline_results_are_metrics_of_the_logged_model_and_a_table(
    registry: MlflowRegistry, client: MlflowClient, mlflow_server: str, service: str, key: Path
) -> None:
    published = registry.publish(signed(service, key))
    model_id = logged_model_id(published)
    assert model_id is not None
    ledger = ReleaseLedger(mlflow_server)
    experiment_id = ledger.experiment_id("canaryflow-conventions-test")
    assert experiment_id is not None
    run_id = client.create_run(experiment_id).info.run_id
    report = report_for(published.signed.manifest.model_id, "baseline")

    ledger.log_offline_results(run_id, report, model_id)

    suite = report.suites[0]
    metrics = {m.key: m for m in client.get_logged_model(model_id).metrics or []}
    assert metrics["golden.accuracy"].value == pytest.approx(suite.candidate_rate) == 6 / 8
    assert metrics["golden.reference_accuracy"].value == pytest.approx(7 / 8)
    assert metrics["golden.delta"].value == pytest.approx(suite.diff) == pytest.approx(-1 / 8)
    assert metrics["golden.n"].value == 8
    assert metrics["golden.delta"].run_id == run_id
    assert client.get_run(run_id).data.metrics["golden.accuracy"] == pytest.approx(6 / 8)
    tags = client.get_logged_model(model_id).tags
    assert tags["canaryflow.offline_decision"] == report.decision.value

    table = json.loads(Path(client.download_artifacts(run_id, OFFLINE_ITEMS)).read_text())
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert [r["item_id"] for r in rows] == [f"g{i}" for i in range(8)]
    assert rows[1]["candidate_passed"] is False and rows[1]["candidate_output"] == "cand 1"
    logged = json.loads(client.get_run(run_id).data.tags["mlflow.loggedArtifacts"])
    assert {"path": OFFLINE_ITEMS, "type": "table"} in logged
