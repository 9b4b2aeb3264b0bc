"""On-demand rollback: traffic back to `last-stable` (or a named version) in one call."""

from __future__ import annotations

import time

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from canaryflow import connections
from canaryflow.contracts import Endpoints, Routes
from canaryflow.settings import Settings, load_endpoints
from tasks.common import RETRY_DELAYS, artifact_key, emit, retry_if_transient
from tasks.registry import retire_challenger
from tasks.traffic import shift_traffic


@task(retries=3, retry_delay_seconds=RETRY_DELAYS, retry_condition_fn=retry_if_transient)
def restore_champion(service: str, target: str | None, reason: str, endpoints: Endpoints) -> str:
    """`champion` goes back to the target (default `last-stable`); returns its version."""
    return connections.registry(endpoints.mlflow_uri).rollback_to(service, target, reason)


@flow(name="rollback", log_prints=True)
def rollback(
    service: str,
    to_version: str | None = None,
    reason: str = "manual rollback",
    endpoints: Endpoints | None = None,
    to_alias: str = "last-stable",
) -> dict[str, object]:
    """Roll `service` back to `to_version` or the version `to_alias` names: traffic first.

    `to_alias="champion"` takes traffic off a canary nobody owns any more (the silence
    automation): an unpromoted candidate never moved the champion, so `champion` stays and the
    challenger is marked rolled back.
    """
    endpoints = endpoints or load_endpoints(Settings().home)
    target = (
        to_version or connections.registry(endpoints.mlflow_uri).resolve(service, to_alias).version
    )
    has_dataplane = endpoints.envoy_admin_url is not None
    if has_dataplane:
        before = connections.traffic_controller(endpoints, service).current()
        started = time.perf_counter()
        shift_traffic(Routes(service=service, stable=target), endpoints)  # one verified call
        traffic_ms = (time.perf_counter() - started) * 1000
    else:
        before, traffic_ms = None, 0.0
    champion = restore_champion(service, target, reason, endpoints)
    retired = retire_challenger(service, reason, endpoints) if to_alias == "champion" else None
    summary: dict[str, object] = {
        "service": service,
        "champion": champion,
        "retired_challenger": retired,
        "previous_stable": before.stable if before else None,
        "traffic_ms": round(traffic_ms, 1),
        "reason": reason,
    }
    create_markdown_artifact(
        key=artifact_key("rollback", service),
        markdown="# Rollback\n\n" + "\n".join(f"- {k}: {v}" for k, v in summary.items()),
        description=f"{service} back to v{champion}",
    )
    emit("rollback", "done", f"{service}-manual", service, **summary)
    print(f"{service}: all traffic on v{champion} ({traffic_ms:.0f} ms); reason: {reason}")
    return summary
