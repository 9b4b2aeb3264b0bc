"""The promotion window's wait: a task of its own, so the UI shows the run waiting and why."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from tasks.approval import approval_heartbeat, heartbeat_every
from tasks.common import emit, say, silence_within_s, step

# How often the wait looks at the clock: a suspended laptop or a stepped clock is noticed soon.
POLL_S = 30.0


@step(retries=0, name="wait-for-promotion-window")
def wait_for_promotion_window(
    opens_at: datetime, release_id: str, service: str, detail: str
) -> None:
    """Sleep until `opens_at`, the candidate still at its last canary weight.

    The wait beats like a paused approval (`canaryflow.approval.heartbeat`, which the
    silent-canary automation expects), so a waiting release is not taken for a dead one, and a
    process that dies while waiting is still rolled back by the automation. A cancel ends the
    flow run, whose cancellation hook rolls the traffic back as at any other point.
    """
    say("%s", detail)
    emit("promote_window", "waiting", release_id, service, opens_at=opens_at.isoformat())
    with approval_heartbeat(release_id, service, "promote", "promotion-window",
                            heartbeat_every(silence_within_s())):  # fmt: skip
        while (left := (opens_at - datetime.now(UTC)).total_seconds()) > 0:
            time.sleep(min(left, POLL_S))
    emit("promote_window", "open", release_id, service)
