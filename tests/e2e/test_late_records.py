"""Every request is counted: the last window's late finishers are judged before promoting.

A record carries its completion time, so a request that starts in the release's last window and
completes after it lands in a window nobody judges. Here a candidate is healthy through Envoy
(the stack's model service) while its requests to a second model service, whose provider hangs
and whose provider timeout is 1.5 s, start in the last second of the only canary window: each is
answered 502 at the timeout and recorded as an error, after the window ended. Without the late
look that release is promoted.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from canaryflow import connections
from canaryflow.contracts import (
    CanaryPlan,
    CanaryStep,
    ReleaseRecord,
    ReleaseSpec,
    Role,
    ShadowConfig,
)
from canaryflow.loading import load_policy
from canaryflow.local import examples
from canaryflow.local.loadgen import TrafficRunner, load_corpus
from canaryflow.local.stack import model_service
from flows.release import release
from tests.e2e.conftest import LiveStack
from tests.waiting import wait_for

POLICY = load_policy(Path(__file__).resolve().parents[2] / "deployments/policies/default.yaml")
WINDOW_S = 3.0
SERVICE_TIMEOUT_S = 1.5


@contextlib.contextmanager
def hung_provider() -> Iterator[str]:
    """A provider that accepts connections and never answers (a hang, not a refusal)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(256)
    held: list[socket.socket] = []
    done = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not done.is_set():
            with contextlib.suppress(OSError):
                held.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        done.set()
        thread.join(5)
        for connection in held:
            connection.close()
        server.close()


def test_late_failing_finishers_of_the_last_window_block_the_promotion(live: LiveStack) -> None:
    begun = datetime.now(UTC)
    registry = connections.registry(live.endpoints.mlflow_uri)
    stable = registry.resolve(examples.SERVICE, "champion").version
    controller = connections.traffic_controller(live.endpoints, examples.SERVICE)
    spec = ReleaseSpec(
        service=examples.SERVICE,
        candidate=live.sign(examples.manifest("4.5", "sandbox-good")),
        suites=["golden"],
        shadow=ShadowConfig(enabled=False),
        canary=CanaryPlan(
            steps=[CanaryStep(weight=50, windows=1, window_s=WINDOW_S)],
            max_extensions=0,
            late_records_s=SERVICE_TIMEOUT_S + 1.0,
        ),
        policy=POLICY,
        lock_wait_s=15,
    )
    with hung_provider() as provider:
        endpoints = live.endpoints.model_copy(
            update={"provider_urls": dict.fromkeys(live.endpoints.provider_urls, provider)}
        )
        base = model_service(Path(live.endpoints.home), "hung", examples.SERVICE, endpoints)
        hung = dataclasses.replace(
            base, command=[*base.command, "--timeout", str(SERVICE_TIMEOUT_S)]
        )
        hung.start(60)
        url = f"http://127.0.0.1:{base.command[base.command.index('--port') + 1]}"
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                result["record"] = release(spec=spec)
            except BaseException as exc:
                result["error"] = exc

        # The release runs beside the test, in this context (Prefect settings, pinned endpoints).
        releasing = threading.Thread(target=contextvars.copy_context().run, args=(run,))
        try:
            with TrafficRunner(str(live.endpoints.envoy_url), load_corpus("live"), rate_rps=200):
                releasing.start()

                # The window starts with the candidate's first records (the route write is
                # confirmed by Envoy before it starts): anchored on their time, not on when this
                # thread noticed.
                first = wait_for(
                    "the canary's first records", lambda: _first_canary(live, begun), 180
                )
                candidate, first_at = first
                # Start in the window's last second, end at the 1.5 s timeout: after it ended.
                fire_at = time.monotonic() + (first_at + WINDOW_S - 1.0 - time.time())
                answers = _hanging_requests(url, candidate, 40, at=fire_at)
                releasing.join(120)
        finally:
            hung.stop()
    assert not releasing.is_alive()
    assert "error" not in result, result
    record: ReleaseRecord = result["record"]
    assert set(answers) == {502}, answers
    assert record.decision == "rolled_back", record.reason
    assert "late records" in record.reason and "error_rate" in record.reason, record.reason
    late = next(s for s in record.stages if s.key == "canary_late")
    assert late.outcome == "failed" and late.metrics["late_candidate"] >= 40
    assert next(s for s in record.stages if s.key == "canary_50pct").outcome == "passed"
    routes = controller.current()
    assert routes is not None and routes.stable == stable and routes.canary is None


def _first_canary(live: LiveStack, since: datetime) -> tuple[str, float] | None:
    store = connections.store(str(live.endpoints.store_url))
    records = store.records(examples.SERVICE, since, datetime.now(UTC), role=Role.CANARY)
    if not records:
        return None
    first = min(records, key=lambda r: r.at)
    return first.version, first.at.timestamp()


def _hanging_requests(url: str, version: str, n: int, *, at: float) -> list[int]:
    """`n` user requests for the candidate, all sent at monotonic time `at` (clients made
    beforehand), as Envoy would send them to this service."""
    headers = {"x-canaryflow-role": "canary", "x-canaryflow-version": version}
    body = {"model": "x", "messages": [{"role": "user", "content": "what is the capital?"}]}
    statuses: list[int] = []
    ready = threading.Barrier(n + 1)

    def one(i: int) -> None:
        with httpx.Client(timeout=10) as client:
            ready.wait(30)
            response = client.post(
                f"{url}/v1/chat/completions",
                json=body,
                headers={**headers, "x-request-id": f"late-{i}-{time.time_ns()}"},
            )
            statuses.append(response.status_code)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    time.sleep(max(0.0, at - time.monotonic()))
    ready.wait(30)
    for thread in threads:
        thread.join(15)
    return statuses
