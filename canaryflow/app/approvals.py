"""Answer a paused release over Prefect's REST API: the same call the Prefect UI makes."""

from __future__ import annotations

import time
from typing import Any

import httpx

from canaryflow.errors import CanaryflowError, ConfigError

# Prefect answers 503 for errors a client may retry (a busy SQLite database, say); its own client
# retries them, and so do we.
RETRY_STATUSES = frozenset({429, 502, 503})
RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0)


def _post(url: str, body: dict[str, Any]) -> httpx.Response:
    for delay in RETRY_DELAYS_S:
        try:
            response = httpx.post(url, json=body, timeout=10)
            if response.status_code not in RETRY_STATUSES:
                return response
        except httpx.TransportError:
            pass
        time.sleep(delay)
    return httpx.post(url, json=body, timeout=10)  # the last try: its answer is the caller's


def resume_with_approval(
    api_url: str, run_id: str, *, approve: bool, reason: str, approver: str
) -> str:
    """POST /flow_runs/{id}/resume with the Approval form; returns Prefect's status (ACCEPT)."""
    body = {"run_input": {"approve": approve, "reason": reason, "approver": approver}}
    response = _post(f"{api_url.rstrip('/')}/flow_runs/{run_id}/resume", body)
    if response.status_code == 404:
        raise ConfigError(f"no flow run {run_id} on {api_url}: check the id in the Prefect UI")
    if response.status_code >= 400:
        raise CanaryflowError(
            f"the Prefect API answered {response.status_code} to resuming flow run {run_id} "
            f"(after {len(RETRY_DELAYS_S)} retries): {response.text[:200]}. The run is still "
            "paused: try again, or answer it in the Prefect UI"
        )
    result: dict[str, Any] = response.json()
    status = str(result.get("status", "")).upper()
    if status != "ACCEPT":
        # Prefect answers 200 with REJECT for a run that is not paused or an invalid form.
        why = (result.get("details") or {}).get("reason", "no reason given")
        raise CanaryflowError(f"Prefect refused to resume flow run {run_id}: {why}")
    return status


def paused_runs(api_url: str, flow_name: str = "release") -> list[dict[str, Any]]:
    """Paused runs of a flow, newest first: what `canaryflow approve` can answer."""
    body = {
        "flows": {"name": {"any_": [flow_name]}},
        "flow_runs": {"state": {"type": {"any_": ["PAUSED"]}}},
        "sort": "START_TIME_DESC",
    }
    response = _post(f"{api_url.rstrip('/')}/flow_runs/filter", body)
    response.raise_for_status()
    runs: list[dict[str, Any]] = response.json()
    return runs
