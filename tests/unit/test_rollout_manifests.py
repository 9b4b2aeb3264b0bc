"""The Argo Rollouts and Flagger examples in deployments/ against the controllers' published CRD
schemas (tests/data/schemas/README.md names their sources), and against the judge they call.

Validation is as strict as `kubectl apply` (strict field validation): a field the schema does
not declare is an error, unless the schema keeps unknown fields
(`x-kubernetes-preserve-unknown-fields`) or declares `additionalProperties` itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import jsonschema
import pytest
import yaml

from canaryflow.app.judge_service import fields_of_body
from canaryflow.app.verdicts import parse_query

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "tests" / "data" / "schemas"
ARGO = ROOT / "deployments" / "argo" / "analysis-template.yaml"
FLAGGER = ROOT / "deployments" / "flagger" / "canary.yaml"


def closed(schema: Any) -> Any:
    """`schema` with every declared object closed to undeclared fields, as the API server's
    strict field validation treats a structural schema."""
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {key: closed(value) for key, value in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        result["additionalProperties"] = False
    return result


def validator(name: str) -> jsonschema.Draft4Validator:
    schema = json.loads((SCHEMAS / name).read_text())
    # Kubernetes' structural schemas are OpenAPI v3 (close to JSON Schema draft 4)
    return jsonschema.Draft4Validator(closed(schema))


def problems(check: jsonschema.Draft4Validator, document: Any) -> list[str]:
    return [
        f"{'/'.join(str(p) for p in e.absolute_path)}: {e.message}"
        for e in check.iter_errors(document)
    ]


ARGO_SCHEMA = "argo-rollouts-analysistemplate-v1alpha1.json"
FLAGGER_SCHEMA = "flagger-canary-v1beta1.json"


def test_the_schemas_name_their_source() -> None:
    readme = (SCHEMAS / "README.md").read_text()
    for name in (ARGO_SCHEMA, FLAGGER_SCHEMA):
        assert name in readme
    assert "argoproj/argo-rollouts" in readme and "fluxcd/flagger" in readme


def test_the_argo_analysis_template_matches_its_crd() -> None:
    document = yaml.safe_load(ARGO.read_text())
    assert (document["apiVersion"], document["kind"]) == (
        "argoproj.io/v1alpha1",
        "AnalysisTemplate",
    )
    assert problems(validator(ARGO_SCHEMA), document) == []


def test_the_flagger_canary_matches_its_crd() -> None:
    document = yaml.safe_load(FLAGGER.read_text())
    assert (document["apiVersion"], document["kind"]) == ("flagger.app/v1beta1", "Canary")
    assert problems(validator(FLAGGER_SCHEMA), document) == []


@pytest.mark.parametrize(
    ("schema", "path", "change"),
    [
        (ARGO_SCHEMA, ARGO, lambda d: d["spec"]["metrics"][0].update(succesCondition="x")),
        (ARGO_SCHEMA, ARGO, lambda d: d["spec"]["metrics"][0]["provider"]["web"].pop("url")),
        (ARGO_SCHEMA, ARGO, lambda d: d["spec"]["metrics"][0].update(interval=60)),
        (FLAGGER_SCHEMA, FLAGGER, lambda d: d["spec"]["analysis"]["webhooks"][0].update(type="x")),
        (FLAGGER_SCHEMA, FLAGGER, lambda d: d["spec"]["analysis"].update(interval="1 minute")),
        (FLAGGER_SCHEMA, FLAGGER, lambda d: d["spec"]["analysis"]["webhooks"][0]["metadata"]
         .update(window=60)),
        (FLAGGER_SCHEMA, FLAGGER, lambda d: d["spec"].pop("targetRef")),
    ],
)  # fmt: skip
def test_a_broken_manifest_is_caught(schema: str, path: Path, change: Any) -> None:
    """The validation has teeth: a misspelt field, a missing or mistyped one is reported."""
    document = yaml.safe_load(path.read_text())
    change(document)
    assert problems(validator(schema), document) != []


def test_the_argo_template_asks_the_judge_and_reads_its_decision() -> None:
    document = yaml.safe_load(ARGO.read_text())
    args = {a["name"]: a.get("value") for a in document["spec"]["args"]}
    metric = document["spec"]["metrics"][0]
    assert metric["successCondition"] == 'result.decision == "pass"'
    assert metric["failureCondition"] == 'result.decision == "fail"'
    web = metric["provider"]["web"]
    url = urlsplit(web["url"])
    assert url.path == "/v1/verdict" and web["jsonPath"] == "{$}"
    example = {"service": "my-assistant", "stable-version": "1", "canary-version": "2"}
    values = {**example, **{k: v for k, v in args.items() if v is not None}}
    fields = {}
    for key, template in parse_qsl(url.query):
        name = template.removeprefix("{{args.").removesuffix("}}")
        assert name in args, f"{key} uses an undeclared arg {template}"
        fields[key] = values[name]
    query = parse_query(fields)
    assert (query.service, query.stable, query.canary) == ("my-assistant", "1", "2")
    assert query.window_s == 60 and metric["interval"] == args["window"]


def test_the_flagger_webhook_payload_is_a_valid_verdict_query() -> None:
    document = yaml.safe_load(FLAGGER.read_text())
    hooks = document["spec"]["analysis"]["webhooks"]
    (hook,) = [h for h in hooks if h["type"] == "rollout"]
    assert urlsplit(hook["url"]).path == "/v1/flagger/verdict"
    payload = {  # what Flagger POSTs (CanaryWebhookPayload)
        "name": document["metadata"]["name"],
        "namespace": document["metadata"]["namespace"],
        "phase": "Progressing",
        "checksum": "6d8bbc9f5f",
        "metadata": hook["metadata"],
    }
    query = parse_query(fields_of_body(payload))
    assert (query.service, query.stable, query.canary) == ("my-assistant", "1", "2")
    assert query.run == "6d8bbc9f5f" and query.window_s == 60
