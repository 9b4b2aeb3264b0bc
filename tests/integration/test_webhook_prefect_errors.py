"""The CI webhook receiver when Prefect's API is busy: retried, then a clear 503 for CI.

Prefect answers 503 for errors a client may retry (a locked database); it cannot be made to do
so on demand, so a stand-in answers at the HTTP boundary: the deployment lookup, then
`create_flow_run` failing `busy` times.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
from starlette.testclient import TestClient

from canaryflow import examples
from canaryflow.signing import generate_keypair, sign
from canaryflow.webhooks import sign_payload
from deployments.webhook import WebhookConfig, build_app

SECRET = "webhook-test-secret"


class BusyPrefect(BaseHTTPRequestHandler):
    busy: ClassVar[int] = 0
    creates: ClassVar[list[dict[str, object]]] = []

    def do_GET(self) -> None:  # the deployment lookup
        self._answer(200, {"id": "deployment-1"})

    def do_POST(self) -> None:  # create_flow_run
        BusyPrefect.creates.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
        if len(BusyPrefect.creates) <= BusyPrefect.busy:
            self._answer(503, {"exception_message": "Service Unavailable"})
        else:
            self._answer(201, {"id": "run-9"})

    def _answer(self, status: int, body: dict[str, object]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def prefect_api() -> Iterator[str]:
    BusyPrefect.creates = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), BusyPrefect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/api"
    server.shutdown()
    server.server_close()


def _delivery(tmp_path: Path) -> tuple[bytes, dict[str, str]]:
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
    return body, headers


def test_busy_prefect_is_retried_with_the_same_idempotency_key(
    prefect_api: str, tmp_path: Path
) -> None:
    BusyPrefect.busy = 2
    body, headers = _delivery(tmp_path)
    with TestClient(build_app(WebhookConfig(secret=SECRET, prefect_api_url=prefect_api))) as client:
        answer = client.post("/hooks/release", content=body, headers=headers)
    assert answer.status_code == 202, answer.text
    assert answer.json() == {"flow_run_id": "run-9", "replayed": False}
    keys = {c["idempotency_key"] for c in BusyPrefect.creates}
    assert len(BusyPrefect.creates) == 3 and keys == {"ci-delivery-delivery-busy"}


def test_prefect_busy_past_the_retries_is_a_503_that_says_redeliver(
    prefect_api: str, tmp_path: Path
) -> None:
    BusyPrefect.busy = 100
    body, headers = _delivery(tmp_path)
    with TestClient(build_app(WebhookConfig(secret=SECRET, prefect_api_url=prefect_api))) as client:
        answer = client.post("/hooks/release", content=body, headers=headers)
    assert answer.status_code == 503
    assert "answered 503" in answer.json()["error"] and "redeliver" in answer.json()["error"]
    assert len(BusyPrefect.creates) == 5
