"""Synthetic load through the real edge is stored and never judged; users beside it are.

The embedded stack's Envoy, model service and store, and the release's own window step
(`runbook.observe_window`: wait a window, wait for the records' watermark, read the store, judge).
Synthetic load goes to Envoy's synthetic listener, which marks it; users go to the public
listener, which drops a client's own `x-canaryflow-synthetic` (these users all send one).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from canaryflow import connections, runbook
from canaryflow.contracts import Decision, Label, Routes, WindowResult
from canaryflow.loading import load_policy
from canaryflow.local import examples
from canaryflow.local.loadgen import TrafficRunner, load_corpus
from tests.e2e.conftest import LiveStack
from tests.waiting import wait_for

POLICY = load_policy(Path(__file__).resolve().parents[2] / "deployments/policies/default.yaml")
RATE_RPS = 100.0
WINDOW_S = 2.0


def test_synthetic_load_is_never_a_sample_and_users_beside_it_are(live: LiveStack) -> None:
    endpoints = live.endpoints
    assert endpoints.envoy_url and endpoints.envoy_synthetic_url and endpoints.store_url
    controller = connections.traffic_controller(endpoints, examples.SERVICE)
    previous = controller.current()
    assert previous is not None, "the stack starts with stable routes"
    # One version on both sides of a 50 % split: stable and canary requests in every window.
    split = Routes(service=examples.SERVICE, stable=previous.stable, canary=previous.stable,
                   weight=50)  # fmt: skip
    prompts = load_corpus(examples.USER_CORPUS)

    def window() -> WindowResult:
        result, _ = runbook.observe_window(
            endpoints, POLICY, stage="canary", routes=split, step=0, window=0,
            window_s=WINDOW_S, memory=None,
        )  # fmt: skip
        return result

    began = datetime.now(UTC)
    try:
        controller.set_routes(split)
        with TrafficRunner(endpoints.envoy_synthetic_url, prompts, RATE_RPS) as synthetic:
            alone = window()
            forged = {"x-canaryflow-synthetic": "1"}  # a client's own mark: dropped at the edge
            with TrafficRunner(endpoints.envoy_url, prompts, RATE_RPS, headers=forged) as users:
                mixed = window()
                served = users.stop()
            sent = synthetic.stop()
    finally:
        controller.set_routes(previous)

    # A window of synthetic load only: nothing for the gates, so no data, never a pass.
    assert alone.requests == {"stable": 0, "canary": 0}, alone.requests
    assert alone.gates[0].gate == "observability" and alone.gates[0].label is Label.NODATA
    assert alone.decision is Decision.INCONCLUSIVE
    # With users in it: the gates count them, and only them.
    assert mixed.gates[0].label is Label.PASS, mixed.gates[0].reason
    assert sum(mixed.requests.values()) >= RATE_RPS * WINDOW_S * 0.5, mixed.requests

    # Every request is in the store, under the kind it was sent as, each once.
    store = connections.store(endpoints.store_url)
    span = (examples.SERVICE, began, datetime.now(UTC) + timedelta(seconds=5))
    # Answered by the model service (its role header came back), errors included: recorded.
    synthetic_n, users_n = sum(sent.roles.values()), sum(served.roles.values())
    assert synthetic_n >= 0.9 * sent.sent and users_n >= 0.9 * served.sent, (sent, served)

    def both_stored() -> tuple[int, int] | None:
        found = store.count(*span, synthetic=True), store.count(*span, synthetic=False)
        return found if found == (synthetic_n, users_n) else None

    wait_for(f"{synthetic_n} synthetic and {users_n} user records", both_stored, 10, 0.2)
    judged = sum(mixed.requests.values())
    assert judged <= users_n  # the mixed window's samples are users' requests only
    print(f"FIGURE synthetic: {synthetic_n} stored, 0 judged; users: {users_n} stored, "
          f"{judged} judged in the {WINDOW_S:g} s window")  # fmt: skip
