"""What every task shares: retry only what can succeed on a retry, and say what happened."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State, TaskRun
from prefect.events import emit_event

from canaryflow.dataplane.logs import bind, log_context
from canaryflow.loading import load_silence_within
from canaryflow.retries import TASK_RETRY, is_retryable

# The project the flows are deployed from (the worker's CANARYFLOW_PROJECT_DIR): its prefect.yaml
# defines the automations.
PROJECT_DIR = Path(__file__).resolve().parents[1]

P = ParamSpec("P")
R = TypeVar("R")


def step(**options: Any) -> Callable[[Callable[P, R]], Task[P, R]]:
    """`@task` with the one retry policy: a task is retried only when `retries.is_retryable`
    says its error can succeed on a retry, after `TASK_RETRY`'s delays (`retries=0` for a
    step that must not repeat). No cache: hashing every input of every call buys nothing here."""
    settings: dict[str, Any] = {
        "retries": len(TASK_RETRY.delays_s),
        "retry_delay_seconds": list(TASK_RETRY.delays_s),
        "retry_condition_fn": retry_if_transient,
        "cache_policy": NO_CACHE,
    }
    return task(**{**settings, **options})  # type: ignore[no-any-return]


def retry_if_transient(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Provider 429/5xx and registry outages are retried; bad input and failed gates are not."""
    try:
        state.result()
    except Exception as exc:
        return is_retryable(exc)
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


def silence_within_s() -> float:
    """The silence automation's `within` (prefect.yaml, trigger canaryflow-silent-canary): the
    one place it is set; preflight checks windows against it, approval heartbeats pace by it."""
    return load_silence_within(PROJECT_DIR / "prefect.yaml")


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


def say(message: str, *args: object) -> None:
    """A line of the release's story: in the run's log (Prefect UI) and, marked with
    `canaryflow_progress`, on the terminal of whoever started the run (`canaryflow.app`)."""
    from prefect import get_run_logger

    get_run_logger().info(message, *args, extra={"canaryflow_progress": True})


def log_labels_of_this_run() -> contextlib.AbstractContextManager[None]:
    """The labels `label_logs` gives canaryflow's log lines end with the run: one process (a
    test session, the demo) may run many releases."""
    return log_context()


def label_logs(release_id: str, service: str, version: str | None = None) -> None:
    """What canaryflow's log lines in this run carry (`CANARYFLOW_LOG_FORMAT=json`): the
    release, the service and, once published, the candidate's version."""
    bind(release_id=release_id, service=service, version=version)
