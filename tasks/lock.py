"""One release per service at a time, held as a Prefect global concurrency limit."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.concurrency.sync import concurrency
from prefect.runtime import flow_run

from canaryflow.errors import ReleaseBusy

# The slot's lease is renewed while the release lives; a killed release frees it within this
# (Prefect refuses leases under 60 s).
LEASE_S = 60.0


def lock_name(service: str) -> str:
    return f"canaryflow-release-{service}"


def releases_in_flight(service: str) -> list[FlowRun]:
    """The other release runs of `service` that have not finished, newest first."""
    live = [StateType.RUNNING, StateType.PAUSED, StateType.PENDING, StateType.CANCELLING]
    states = FlowRunFilterState(type=FlowRunFilterStateType(any_=live))
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["release"])),
            flow_run_filter=FlowRunFilter(state=states),
        )
    me = str(flow_run.id or "")
    return [
        run
        for run in runs
        if str(run.id) != me and (run.parameters.get("spec") or {}).get("service") == service
    ]


def describe_run(run: FlowRun) -> str:
    return f"{run.name} ({run.id}, {run.state.name if run.state else 'unknown'})"


@contextlib.contextmanager
def release_lock(service: str, wait_s: float) -> Iterator[None]:
    """Wait up to `wait_s` for the running release of `service`, then refuse with ReleaseBusy."""
    name = lock_name(service)
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, limit=1)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(
                concurrency(
                    name,
                    occupy=1,
                    timeout_seconds=max(wait_s, 0.5),
                    strict=True,
                    lease_duration=LEASE_S,
                )
            )
        except TimeoutError as exc:  # only the acquisition: errors of the release pass through
            holders = ", ".join(map(describe_run, releases_in_flight(service))) or (
                f"no live run found: a killed release's slot frees within {LEASE_S:g} s"
            )
            raise ReleaseBusy(
                f"another release of {service!r} is running and holds its lock ({holders}); "
                f"waited {wait_s:g} s. "
                "Let it finish, or cancel its flow run in the Prefect UI, then start this "
                "release again."
            ) from exc
        yield


def cancel_releases_in_flight(service: str, reason: str) -> list[str]:
    """Cancel every unfinished release of `service` (a worker-run release's cancellation hook
    takes its traffic back to stable); returns what was cancelled."""
    from prefect.states import Cancelling

    runs = releases_in_flight(service)
    with get_client(sync_client=True) as client:
        for run in runs:
            client.set_flow_run_state(run.id, Cancelling(message=reason), force=True)
    return [describe_run(run) for run in runs]
