"""What every task shares: retry only what can succeed on a retry, and say what happened."""

from __future__ import annotations

from typing import Any

from prefect import Task
from prefect.client.schemas.objects import State, TaskRun
from prefect.events import emit_event

from canaryflow.errors import RetryableError

RETRY_DELAYS: list[float] = [1.0, 3.0, 9.0]


def retry_if_transient(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Provider 429/5xx and registry outages are retried; bad input and failed gates are not."""
    try:
        state.result()
    except RetryableError:
        return True
    except Exception:
        return False
    return False


def emit(stage: str, outcome: str, release_id: str, service: str, /, **payload: Any) -> None:
    """`canaryflow.<stage>.<outcome>`, the event automations and dashboards key on."""
    emit_event(
        event=f"canaryflow.{stage}.{outcome}",
        resource={
            "prefect.resource.id": f"canaryflow.release.{release_id}",
            "prefect.resource.name": release_id,
            "canaryflow.service": service,
        },
        payload=payload,
    )


def flush_events(timeout_s: float = 5.0) -> bool:
    """Send queued events now: a process that stops right after a release would lose them.

    False when the queue (ours and Prefect's own task-run events, ~3 per task) did not empty
    within `timeout_s`: the rest is still being sent in the background, not lost, unless the
    process exits first.
    """
    from prefect.events.worker import EventsWorker

    waited = EventsWorker.drain_all(timeout=timeout_s, at_exit=False)
    pending = waited[1] if isinstance(waited, tuple) else set()
    if pending:
        print(f"events: {len(pending)} queue(s) still sending after {timeout_s:g} s")
    return not pending


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    raw = "-".join(parts).lower()
    return "".join(c if c.isalnum() else "-" for c in raw).strip("-")
