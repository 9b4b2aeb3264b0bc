"""prefect.yaml deploys on the real server; the CI webhook starts one release per delivery."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from canaryflow.deliveries import SeenDeliveries, sign_payload
from canaryflow.local import examples
from deployments.webhook import WebhookConfig, build_app
from tests.e2e.conftest import LiveStack, prefect_cli

SECRET = "test-secret-for-ci"


@pytest.fixture(scope="module")
def deployed(live: LiveStack) -> LiveStack:
    created = prefect_cli(live, "work-pool", "create", "canaryflow", "--type", "process")
    assert created.returncode == 0, created.stdout + created.stderr
    deployed = prefect_cli(live, "deploy", "--all")
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    return live


def test_prefect_yaml_deploys_release_rollback_and_nightly_eval(deployed: LiveStack) -> None:
    api = str(deployed.endpoints.prefect_api_url)
    names = {d["name"] for d in httpx.post(f"{api}/deployments/filter", json={}).json()}
    assert {"release", "rollback", "nightly-eval"} <= names
    nightly = httpx.get(f"{api}/deployments/name/nightly-eval/nightly-eval").json()
    assert nightly["schedules"][0]["schedule"]["cron"] == "0 2 * * *"


def _deliver(client: TestClient, body: bytes, delivery: str, *, secret: str = SECRET,
             timestamp: float | None = None) -> Any:  # fmt: skip
    stamp = str(int(timestamp if timestamp is not None else time.time()))
    return client.post(
        "/hooks/release",
        content=body,
        headers={
            "x-canaryflow-timestamp": stamp,
            "x-canaryflow-delivery": delivery,
            "x-canaryflow-signature": sign_payload(secret, stamp, delivery, body),
        },
    )


def _spec_body(live: LiveStack) -> bytes:
    signed = live.sign(examples.manifest("3.0", "sandbox-good"))
    spec = {"service": examples.SERVICE, "candidate": signed.model_dump(mode="json")}
    return json.dumps({"spec": spec}).encode()


def test_signed_delivery_starts_one_release_run(deployed: LiveStack) -> None:
    api = str(deployed.endpoints.prefect_api_url)
    config = WebhookConfig(secret=SECRET, prefect_api_url=api)
    body = _spec_body(deployed)
    with TestClient(build_app(config)) as client:
        first = _deliver(client, body, "delivery-1")
        assert first.status_code == 202, first.text
        run_id = first.json()["flow_run_id"]
        again = _deliver(client, body, "delivery-1")
        assert again.status_code == 200 and again.json() == {
            "flow_run_id": run_id,
            "replayed": True,
        }
    run = httpx.get(f"{api}/flow_runs/{run_id}").json()
    assert run["parameters"]["spec"]["service"] == examples.SERVICE
    # A restarted receiver has forgotten the delivery: Prefect's idempotency key still holds.
    config.seen = SeenDeliveries()
    with TestClient(build_app(config)) as client:
        assert _deliver(client, body, "delivery-1").json()["flow_run_id"] == run_id
    httpx.post(
        f"{api}/flow_runs/{run_id}/set_state", json={"state": {"type": "CANCELLED"}, "force": True}
    )


def test_bad_signature_stale_delivery_and_bad_spec_are_refused(deployed: LiveStack) -> None:
    config = WebhookConfig(secret=SECRET, prefect_api_url=str(deployed.endpoints.prefect_api_url))
    body = _spec_body(deployed)
    with TestClient(build_app(config)) as client:
        forged = _deliver(client, body, "d-forged", secret="wrong")
        assert forged.status_code == 401 and "shared secret" in forged.json()["error"]
        stale = _deliver(client, body, "d-stale", timestamp=time.time() - 3600)
        assert stale.status_code == 401 and "old" in stale.json()["error"]
        bad = json.dumps(
            {"spec": {"service": "my-assistant", "canary": {"steps": [{"weight": 300}]}}}
        )
        invalid = _deliver(client, bad.encode(), "d-invalid")
        assert invalid.status_code == 422
        assert (
            "candidate" in invalid.json()["error"]
            and "canary.steps.0.weight" in invalid.json()["error"]
        )
