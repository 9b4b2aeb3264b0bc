"""Answer a paused release through Prefect's own client: the same resume the Prefect UI sends.

Prefect's client already retries its API's retryable answers (429, 502, 503, up to
PREFECT_CLIENT_MAX_RETRIES), so there is no retry loop here. `prefect.flow_runs.resume_flow_run`
is not used: it refuses a run that is not paused before asking the server, lets the server's
ABORT pass as success and hides the server's verdict in a RuntimeError; the client's own
`resume_flow_run` returns that verdict, which is what the errors below report.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from uuid import UUID

import httpx
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.responses import SetStateStatus
from prefect.client.schemas.sorting import FlowRunSort
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL, temporary_settings

from canaryflow.errors import CanaryflowError, ConfigError


@contextmanager
def prefect_client(api_url: str) -> Iterator[SyncPrefectClient]:
    """A client for `api_url`, whatever PREFECT_API_URL the process was started with."""
    with (
        temporary_settings(updates={PREFECT_API_URL: api_url}),
        get_client(sync_client=True) as client,
    ):
        yield client


def resume_with_approval(
    api_url: str, run_id: str, *, approve: bool, reason: str, approver: str
) -> str:
    """Resume the paused run with the Approval form; returns Prefect's status (ACCEPT)."""
    try:
        flow_run_id = UUID(run_id)
    except ValueError:
        raise ConfigError(
            f"{run_id!r} is not a flow run id: copy its UUID from the Prefect UI"
        ) from None
    decision = "approve" if approve is True else "reject" if approve is False else approve
    run_input = {"decision": decision, "reason": reason, "approver": approver}
    try:
        with prefect_client(api_url) as client:
            client.read_flow_run(flow_run_id)  # resuming an unknown id is a 500, not a 404
            result = client.resume_flow_run(flow_run_id, run_input=run_input)
    except ObjectNotFound:
        raise ConfigError(
            f"no flow run {run_id} on {api_url}: check the id in the Prefect UI"
        ) from None
    except (httpx.HTTPStatusError, httpx.TransportError) as exc:
        raise CanaryflowError(
            f"the Prefect API at {api_url} {_failure(exc)} when resuming flow run {run_id}. "
            "The run is still paused: try again, or answer it in the Prefect UI"
        ) from exc
    if result.status != SetStateStatus.ACCEPT:
        # REJECT for an invalid form, ABORT for a run that is not paused (any more).
        why = getattr(result.details, "reason", None) or "no reason given"
        raise CanaryflowError(f"Prefect refused to resume flow run {run_id}: {why}")
    return str(result.status.value)


def paused_runs(api_url: str, flow_name: str = "release") -> list[dict[str, Any]]:
    """Paused runs of a flow, newest first: what `canaryflow approve` can answer."""
    paused = FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))
    with prefect_client(api_url) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
            flow_run_filter=FlowRunFilter(state=paused),
            sort=FlowRunSort.START_TIME_DESC,
        )
    return [run.model_dump(mode="json") for run in runs]


def _failure(exc: httpx.HTTPStatusError | httpx.TransportError) -> str:
    if isinstance(exc, httpx.HTTPStatusError):
        return f"answered {exc.response.status_code} ({exc.response.text[:200]})"
    return f"was unreachable ({type(exc).__name__}: {exc})"
