"""The `canaryflow` command against the session's stack, as a user runs it: a subprocess."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx

from canaryflow.app.approvals import paused_runs, resume_with_approval
from canaryflow.contracts import ApprovalConfig, ReleaseRecord
from canaryflow.deliveries import (
    WEBHOOK_PATH,
    WEBHOOK_SECRET_ENV,
    WEBHOOK_SECRET_FILE,
    sign_payload,
)
from canaryflow.local import examples
from canaryflow.local.loadgen import TrafficRunner
from flows.release import release
from flows.rollback import rollback
from tests.e2e.conftest import LiveStack
from tests.e2e.test_release import COST_ONLY, _in_background, _wait_for_pause, spec_for

REPO = Path(__file__).resolve().parents[2]


def canaryflow(live: LiveStack, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
    return subprocess.run(
        [sys.executable, "-m", "canaryflow.app.cli", "--home", live.endpoints.home, *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_approve_resumes_a_paused_release_which_then_promotes(
    live: LiveStack, users: TrafficRunner
) -> None:
    signed = live.sign(examples.manifest("7.1", "sandbox-verbose"))
    approval = ApprovalConfig(timeout_s=90, poll_s=1)
    spec = spec_for(live, signed, policy=COST_ONLY, approval=approval)
    spec = spec.model_copy(update={"suites": ["golden"]})  # the pause is what this test is about
    thread, box = _in_background(lambda: release(spec=spec))
    run_id = _wait_for_pause(live, thread)
    try:
        waiting = canaryflow(live, "approve", "--list")
        assert waiting.returncode == 0 and run_id in waiting.stdout, waiting.stderr

        done = canaryflow(
            live, "approve", run_id, "--reason", "cost accepted", "--approver", "cli-on-call"
        )

        assert done.returncode == 0, done.stderr
        assert f"flow run {run_id}: approved by cli-on-call (ACCEPT)" in done.stdout
    finally:
        if paused_runs(str(live.endpoints.prefect_api_url)):  # free the service for other tests
            resume_with_approval(str(live.endpoints.prefect_api_url), run_id, approve=False,
                                 reason="test cleanup", approver="pytest")  # fmt: skip
        thread.join(120)
    record: ReleaseRecord | None = box.get("record")
    assert record is not None, box.get("error")
    assert record.decision == "promoted", record.reason
    approvals = [s for s in record.stages if s.key.endswith("_approval")]
    assert [a.outcome for a in approvals] == ["approved"]
    assert approvals[0].detail == "cli-on-call: cost accepted"
    rollback(service=examples.SERVICE, reason="undo the verbose adapter")


def test_approve_on_a_run_that_is_not_paused_fails_with_a_clear_error(live: LiveStack) -> None:
    api = str(live.endpoints.prefect_api_url)
    flow = httpx.post(f"{api}/flows/", json={"name": "release"}).json()
    finished = httpx.post(
        f"{api}/flow_runs/", json={"flow_id": flow["id"], "state": {"type": "COMPLETED"}}
    ).json()

    refused = canaryflow(live, "approve", finished["id"], "--reason", "looks fine")

    assert refused.returncode == 2
    assert "not paused" in refused.stderr and "releases waiting for approval" in refused.stderr
    assert "Traceback" not in refused.stderr
    garbled = canaryflow(live, "approve", "not-a-run", "--reason", "x")
    assert garbled.returncode == 2 and "is not a flow run id" in garbled.stderr


def _deliver(url: str, body: bytes, secret: str) -> httpx.Response:
    stamp = str(int(time.time()))
    delivery = f"cli-test-{uuid.uuid4()}"
    return httpx.post(
        url,
        content=body,
        headers={
            "x-canaryflow-timestamp": stamp,
            "x-canaryflow-delivery": delivery,
            "x-canaryflow-signature": sign_payload(secret, stamp, delivery, body),
        },
        timeout=10,
    )


def _ensure_release_deployment(api: str) -> None:
    """The receiver starts runs of `release/release`; prefect.yaml normally deploys it."""
    if httpx.get(f"{api}/deployments/name/release/release").status_code == 404:
        flow = httpx.post(f"{api}/flows/", json={"name": "release"}).json()
        created = httpx.post(f"{api}/deployments/", json={"name": "release", "flow_id": flow["id"]})
        assert created.status_code < 300, created.text


def test_stack_runs_the_webhook_receiver_with_an_owner_only_secret(live: LiveStack) -> None:
    home = Path(live.endpoints.home)
    url = live.endpoints.webhook_url
    assert url is not None and url.startswith("http://127.0.0.1:")
    if os.environ.get(WEBHOOK_SECRET_ENV):
        secret = os.environ[WEBHOOK_SECRET_ENV]
    else:
        secret_file = home / WEBHOOK_SECRET_FILE
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
        secret = secret_file.read_text().strip()
    api = str(live.endpoints.prefect_api_url)
    _ensure_release_deployment(api)
    spec = {
        "service": examples.SERVICE,
        "candidate": live.sign(examples.manifest("7.2", "sandbox-good")).model_dump(mode="json"),
    }
    body = json.dumps({"spec": spec}).encode()

    accepted = _deliver(url + WEBHOOK_PATH, body, secret)
    forged = _deliver(url + WEBHOOK_PATH, body, "not-the-secret")

    assert accepted.status_code == 202, accepted.text
    run_id = accepted.json()["flow_run_id"]
    run = httpx.get(f"{api}/flow_runs/{run_id}").json()
    assert run["parameters"]["spec"]["service"] == examples.SERVICE
    httpx.post(
        f"{api}/flow_runs/{run_id}/set_state", json={"state": {"type": "CANCELLED"}, "force": True}
    )
    assert forged.status_code == 401
    assert "signature does not match the body: check the shared secret" in forged.json()["error"]


def test_status_shows_the_webhook_receiver(live: LiveStack) -> None:
    shown = canaryflow(live, "status", examples.SERVICE)
    assert shown.returncode == 0, shown.stderr
    assert f"CI webhook receiver: {live.endpoints.webhook_url}" in shown.stdout
