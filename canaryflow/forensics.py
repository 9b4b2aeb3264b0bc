"""What a rollback keeps: enough evidence for a post-mortem after the candidate is gone."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from canaryflow import connections
from canaryflow.contracts import Endpoints, Routes, WindowResult

SAMPLE_SIZE = 50


def capture(
    endpoints: Endpoints,
    service: str,
    *,
    since: datetime,
    until: datetime,
    candidate_version: str,
    routes_before: Routes | None,
    routes_after: Routes | None,
    windows: list[WindowResult],
    reason: str,
) -> dict[str, Any]:
    """Window metrics and gate evidence, routes before and after, a sample of real requests."""
    bundle: dict[str, Any] = {
        "service": service,
        "candidate_version": candidate_version,
        "reason": reason,
        "since": since.isoformat(),
        "until": until.isoformat(),
        "routes_before": routes_before.model_dump(mode="json") if routes_before else None,
        "routes_after": routes_after.model_dump(mode="json") if routes_after else None,
        "windows": [w.model_dump(mode="json") for w in windows],
    }
    if endpoints.store_url is not None:
        store = connections.store(endpoints.store_url)
        candidate = store.sample(service, since, until, SAMPLE_SIZE, version=candidate_version)
        pairs = store.pairs(service, since, until)[:SAMPLE_SIZE]
        bundle["candidate_requests"] = [r.model_dump(mode="json") for r in candidate]
        bundle["paired_responses"] = [
            {"primary": p.model_dump(mode="json"), "shadow": s.model_dump(mode="json")}
            for p, s in pairs
        ]
    return bundle
