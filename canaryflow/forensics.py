"""What a rollback keeps: enough evidence for a post-mortem after the candidate is gone.

The bundle goes to the ledger as an artifact, so it carries no raw personal data: requests come
from the store (masked text, hashed user ids) and are masked again here, which also covers rows
written before a detector existed; a user id not in the hashed `u_<16 hex>` form (a row from
before ids were hashed) becomes `[USER]`, and the reason is masked like any text.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from canaryflow import connections
from canaryflow.contracts import Endpoints, RequestRecord, Routes, WindowResult
from canaryflow.dataplane.pii import mask_pii

SAMPLE_SIZE = 50
UNKNOWN_USER = "[USER]"
_HASHED_USER = re.compile(r"u_[0-9a-f]{16}")


def _safe(record: RequestRecord) -> dict[str, Any]:
    data = record.model_dump(mode="json")
    data["prompt"] = mask_pii(record.prompt)
    data["response"] = mask_pii(record.response)
    if record.user is not None and not _HASHED_USER.fullmatch(record.user):
        data["user"] = UNKNOWN_USER
    return data


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
        "reason": mask_pii(reason),
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
        bundle["candidate_requests"] = [_safe(r) for r in candidate]
        bundle["paired_responses"] = [{"primary": _safe(p), "shadow": _safe(s)} for p, s in pairs]
    return bundle
