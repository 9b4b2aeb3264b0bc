"""A release whose live judge is down is not promoted, and says why.

The stack's model services run the built-in checkers with the LLM judge reached through its own
provider entry (`conftest.JUDGE`, a sandbox process). Stopped, every judge call fails: the
answers are stored unchecked, the hallucination gate has nothing judged, and the release stops
on the observability tier (no data), naming the judge, instead of passing on silence.
"""

from __future__ import annotations

import pytest

from canaryflow import connections
from canaryflow.local import examples
from flows.release import release
from tests.e2e.conftest import LiveStack
from tests.e2e.test_release import champion, spec_for


@pytest.mark.usefixtures("users")  # the gates judge their requests
def test_a_release_whose_judge_is_down_is_not_promoted_and_says_why(live: LiveStack) -> None:
    before = champion(live)
    signed = live.sign(examples.manifest("1.9", "sandbox-good"))  # a good candidate
    live.judge.stop()
    try:
        record = release(spec=spec_for(live, signed, shadow=True, weights=(25.0,)))
    finally:
        live.judge.start(timeout_s=30)

    assert record.decision != "promoted", record.reason
    reason = record.reason.lower()
    assert "hallucination" in reason, record.reason
    assert "llm_judge/sandbox-judge/v1" in record.reason, record.reason
    assert "0 judged" in reason and "failed" in reason, record.reason
    assert champion(live) == before
    routes = connections.traffic_controller(live.endpoints, examples.SERVICE).current()
    assert routes is not None and routes.stable == before and routes.weight == 0
