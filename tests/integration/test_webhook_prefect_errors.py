"""The CI webhook receiver when Prefect's API is busy: retried, then a clear 503 for CI.

Prefect answers 503 for errors a client may retry (a locked database); it cannot be made to do
so on demand, so a stand-in (`BusyPrefect`) answers at the HTTP boundary: the
deployment lookup, then `create_flow_run` failing `busy` times.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
from starlette.testclient import TestClient

from canaryflow.deliveries import sign_payload
from canaryflow.local import examples
from canaryflow.registry.signing import generate_keypair, sign
from deployments.webhook import WebhookConfig, build_app
from tests.integration.busy_prefect import BusyPrefect

SECRET = "webhook-test-secret"


def _deliver(prefect_api: str, tmp_path: Path) -> httpx.Response:
    """One signed delivery to a receiver that talks to `prefect_api`."""
    keys = generate_keypair(tmp_path, "ci")
    signed = sign(examples.manifest("3.0", "sandbox-good"), keys.private_path)
    spec = {"service": examples.SERVICE, "candidate": signed.model_dump(mode="json")}
    body = json.dumps({"spec": spec}).encode()
    stamp = str(int(time.time()))
    headers = {
        "x-canaryflow-timestamp": stamp,
        "x-canaryflow-delivery": "delivery-busy",
        "x-canaryflow-signature": sign_payload(SECRET, stamp, body),
    }
    with TestClient(build_app(WebhookConfig(secret=SECRET, prefect_api_url=prefect_api))) as client:
        return client.post("/hooks/release", content=body, headers=headers)


def test_busy_prefect_is_retried_with_the_same_idempotency_key(
    busy_prefect: str, tmp_path: Path
) -> None:
    BusyPrefect.busy, BusyPrefect.ok = 2, (201, {"id": "run-9"})
    answer = _deliver(busy_prefect, tmp_path)
    assert answer.status_code == 202, answer.text
    assert answer.json() == {"flow_run_id": "run-9", "replayed": False}
    keys = {c["idempotency_key"] for c in BusyPrefect.posts}
    assert len(BusyPrefect.posts) == 3 and keys == {"ci-delivery-delivery-busy"}


def test_prefect_busy_past_the_retries_is_a_503_that_says_redeliver(
    busy_prefect: str, tmp_path: Path
) -> None:
    BusyPrefect.busy = 100
    answer = _deliver(busy_prefect, tmp_path)
    assert answer.status_code == 503
    assert "answered 503" in answer.json()["error"] and "redeliver" in answer.json()["error"]
    assert len(BusyPrefect.posts) == 5
