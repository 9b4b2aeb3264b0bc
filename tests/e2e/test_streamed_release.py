"""Streamed chat through the embedded stack: Envoy, the model service, the store, and a release
whose candidate makes users wait twice as long for the first token."""

from __future__ import annotations

import statistics
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from canaryflow import connections
from canaryflow.contracts import Role
from canaryflow.local import examples
from flows.release import release
from tests.e2e.conftest import LiveStack
from tests.e2e.test_release import champion, spec_for
from tests.waiting import wait_for

ASK = "How do I rotate an API key without downtime? Explain the steps in detail."


def _stream(client: httpx.Client) -> tuple[str, list[float]]:
    """One streamed chat through Envoy: its request id and when each event arrived (s)."""
    sent = time.perf_counter()
    arrivals: list[float] = []
    body = {"model": "x", "messages": [{"role": "user", "content": ASK}], "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        buffer = b""
        for data in response.iter_raw():
            buffer += data
            while b"\n\n" in buffer:
                _, buffer = buffer.split(b"\n\n", 1)
                arrivals.append(time.perf_counter() - sent)
        return response.headers["x-request-id"], arrivals


def test_a_streamed_chat_through_envoy_arrives_event_by_event(live: LiveStack) -> None:
    with httpx.Client(base_url=str(live.endpoints.envoy_url), timeout=10) as client:
        runs = [_stream(client) for _ in range(7)]
    # The provider spreads ~70% of its latency over the events: a buffering hop would hand
    # them over in one piece (a spread under a millisecond).
    spreads = [arrivals[-1] - arrivals[1] for _, arrivals in runs]
    assert statistics.median(spreads) > 0.008, spreads
    assert all(len(arrivals) >= 5 for _, arrivals in runs)

    store = connections.store(str(live.endpoints.store_url))
    since = datetime.now(UTC) - timedelta(minutes=5)

    def stored() -> list:
        ids = {request_id for request_id, _ in runs}
        records = store.records(examples.SERVICE, since, datetime.now(UTC) + timedelta(1))
        return [r for r in records if r.request_id in ids and r.role is Role.STABLE]

    records = wait_for("the streamed records", lambda: len(stored()) == len(runs) and stored())
    for record in records:
        assert record.status == 200 and record.streamed
        assert record.ttft_ms is not None and 0 < record.ttft_ms < record.latency_ms
        assert record.response and record.tokens_out > 0


@pytest.mark.usefixtures("users")  # nine in ten stream
def test_twice_the_time_to_first_token_is_rolled_back_by_ttft_p95(live: LiveStack) -> None:
    before = champion(live)
    # Same latency distribution as the champion's profile, first token at 60% instead of 30%.
    signed = live.sign(examples.manifest("1.6", "sandbox-base@ttft_share=0.6"))
    # Two windows at 50%: ~200 streamed answers per role per window. The path's own tail (the
    # services' live checks share their loop) adds the same milliseconds to both roles' TTFT and
    # pulls the ratio toward 1, so one small window can miss a real 2x.
    record = release(spec=spec_for(live, signed, weights=(50.0, 50.0)))

    assert record.decision == "rolled_back", [(s.key, s.outcome, s.metrics) for s in record.stages]
    assert "ttft_p95" in record.reason, record.reason
    assert "latency_p95" not in record.reason, record.reason
    assert champion(live) == before
