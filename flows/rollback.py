"""On-demand rollback: traffic back to `last-stable` (or a named version) in one call."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from canaryflow.contracts import Endpoints
from canaryflow.settings import Settings
from tasks.common import artifact_key, emit, say
from tasks.registry import resolve_version, restore_champion, retire_challenger, verify_version
from tasks.traffic import send_all_traffic_to


@flow(name="rollback")
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

    The target's signature is verified with the worker's trusted keys before any traffic
    moves: a tampered or wrongly signed target stops the flow with the error, routes and aliases
    untouched. Not for `to_alias="champion"` without a version: that is a retreat to the
    version stable traffic already has (a refusal would leave traffic on the abandoned canary),
    and the model services serve only a verified copy of it anyway.
    """
    endpoints = endpoints or Settings().endpoints()
    target = to_version or resolve_version(service, to_alias, endpoints).version
    if to_version is not None or to_alias != "champion":
        verify_version(service, target, endpoints)
    change = None
    if endpoints.envoy_admin_url is not None:  # a registry-only stack has no traffic to move
        change = send_all_traffic_to(service, target, endpoints)
    champion = restore_champion(service, target, reason, endpoints)
    retired = retire_challenger(service, reason, endpoints) if to_alias == "champion" else None
    summary: dict[str, object] = {
        "service": service,
        "champion": champion,
        "retired_challenger": retired,
        "previous_stable": change.before.stable if change and change.before else None,
        "traffic_ms": round(change.rollback_ms, 1) if change else 0.0,
        "reason": reason,
    }
    create_markdown_artifact(
        key=artifact_key("rollback", service),
        markdown="# Rollback\n\n" + "\n".join(f"- {k}: {v}" for k, v in summary.items()),
        description=f"{service} back to v{champion}",
    )
    emit("rollback", "done", f"{service}-manual", service, **summary)
    say(
        "%s: all traffic on v%s (%s ms); reason: %s",
        service,
        champion,
        summary["traffic_ms"],
        reason,
    )
    return summary
