"""The CI webhook receiver when Prefect's API is busy: retried, then a clear 503 for CI.

The receiver talks to a real Prefect server through `BusyPrefect`, a proxy that answers
Prefect's retryable 503 on `create_flow_run` on demand and forwards everything else.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import httpx
import pytest
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterIdempotencyKey
from starlette.testclient import TestClient

from canaryflow import retries
from canaryflow.app.approvals import prefect_client
from canaryflow.deliveries import sign_payload
from canaryflow.local import examples
from canaryflow.registry.signing import generate_keypair, sign
from deployments.webhook import WebhookConfig, build_app
from tests.integration.busy_prefect import BusyPrefect

SECRET = "webhook-test-secret"
LOOKUP = "/api/deployments/name/release/release"


@pytest.fixture(scope="module")
def deployment(prefect_api: str) -> str:
    """The `release/release` deployment the receiver starts runs of; its id."""
    with prefect_client(prefect_api) as client:
        flow_id = client.create_flow_from_name("release")
        return str(client.create_deployment(flow_id=flow_id, name="release"))


def _delivery(tmp_path: Path) -> tuple[bytes, dict[str, str]]:
    """One signed delivery with an id of its own."""
    keys = generate_keypair(tmp_path, "ci", [examples.SERVICE])
    signed = sign(examples.manifest("3.0", "sandbox-good"), keys.private_path)
    spec = {"service": examples.SERVICE, "candidate": signed.model_dump(mode="json")}
    body = json.dumps({"spec": spec}).encode()
    stamp = str(int(time.time()))
    delivery = f"delivery-{uuid.uuid4().hex[:8]}"
    return body, {
        "x-canaryflow-timestamp": stamp,
        "x-canaryflow-delivery": delivery,
        "x-canaryflow-signature": sign_payload(SECRET, stamp, delivery, body),
    }


def _send(prefect_api: str, delivery: tuple[bytes, dict[str, str]]) -> httpx.Response:
    """The delivery to a fresh receiver (nothing remembered) that talks to `prefect_api`."""
    body, headers = delivery
    with TestClient(build_app(WebhookConfig(secret=SECRET, prefect_api_url=prefect_api))) as client:
        answer: httpx.Response = client.post("/hooks/release", content=body, headers=headers)
    return answer


def _runs_with_key(prefect_api: str, key: str) -> list[str]:
    only = FlowRunFilter(idempotency_key=FlowRunFilterIdempotencyKey(any_=[key]))
    with prefect_client(prefect_api) as client:
        return [str(run.id) for run in client.read_flow_runs(flow_run_filter=only)]


def test_busy_prefect_is_retried_with_the_same_idempotency_key(
    busy_prefect: BusyPrefect, deployment: str, prefect_api: str, tmp_path: Path
) -> None:
    create = f"/api/deployments/{deployment}/create_flow_run"
    busy_prefect.fail(create, times=2)
    delivery = _delivery(tmp_path)
    answer = _send(busy_prefect.api_url, delivery)
    assert answer.status_code == 202, answer.text
    run_id = answer.json()["flow_run_id"]
    assert busy_prefect.calls("/api/deployments/") == [
        ("GET", LOOKUP, 200),
        ("POST", create, 503),
        ("POST", create, 503),
        ("POST", create, 201),
    ]
    key = f"ci-delivery-{delivery[1]['x-canaryflow-delivery']}"
    assert {body["idempotency_key"] for body in busy_prefect.bodies(create)} == {key}
    assert _runs_with_key(prefect_api, key) == [run_id]  # the run is real, and there is one


def test_prefect_busy_past_the_retries_is_a_503_that_says_redeliver(
    busy_prefect: BusyPrefect, deployment: str, prefect_api: str, tmp_path: Path
) -> None:
    create = f"/api/deployments/{deployment}/create_flow_run"
    busy_prefect.fail(create, times=100)
    delivery = _delivery(tmp_path)
    answer = _send(busy_prefect.api_url, delivery)
    assert answer.status_code == 503
    assert "answered 503" in answer.json()["error"] and "redeliver" in answer.json()["error"]
    assert busy_prefect.calls(create) == [("POST", create, 503)] * retries.DEFAULT.attempts
    key = f"ci-delivery-{delivery[1]['x-canaryflow-delivery']}"
    assert _runs_with_key(prefect_api, key) == []
    # Redelivering is safe, as the answer says: Prefect, healthy again, starts one run only.
    first = _send(prefect_api, delivery).json()["flow_run_id"]
    assert _send(prefect_api, delivery).json()["flow_run_id"] == first
    assert _runs_with_key(prefect_api, key) == [first]
