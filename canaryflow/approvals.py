"""Answer a paused release over Prefect's REST API: the same call the Prefect UI makes."""

from __future__ import annotations

from typing import Any

import httpx

from canaryflow.errors import CanaryflowError, ConfigError


def resume_with_approval(
    api_url: str, run_id: str, *, approve: bool, reason: str, approver: str
) -> str:
    """POST /flow_runs/{id}/resume with the Approval form; returns Prefect's status (ACCEPT)."""
    body = {"run_input": {"approve": approve, "reason": reason, "approver": approver}}
    response = httpx.post(f"{api_url.rstrip('/')}/flow_runs/{run_id}/resume", json=body, timeout=10)
    if response.status_code == 404:
        raise ConfigError(f"no flow run {run_id} on {api_url}: check the id in the Prefect UI")
    response.raise_for_status()
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
    response = httpx.post(f"{api_url.rstrip('/')}/flow_runs/filter", json=body, timeout=10)
    response.raise_for_status()
    runs: list[dict[str, Any]] = response.json()
    return runs
