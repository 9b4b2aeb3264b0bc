"""On-demand rollback: traffic back to `last-stable` (or a named version) in one call."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from canaryflow.settings import worker_endpoints
from tasks.common import artifact_key, emit, say
from tasks.registry import resolve_version, restore_champion, retire_challenger, verify_version
from tasks.traffic import roll_back_traffic, send_all_traffic_to


@flow(name="rollback")
def rollback(
    service: str,
    to_version: str | None = None,
    reason: str = "manual rollback",
    to_alias: str = "last-stable",
) -> dict[str, object]:
    """Roll `service` back to `to_version` or the version `to_alias` names: traffic first.

    `to_alias="champion"` takes traffic off a canary nobody owns any more (the silence
    automation, on-call during a release): the canary leaves the routes file at once, with no
    registry call before it (the registry may be what failed), and traffic stays on the stable
    the release started from. Then the registry: an unpromoted candidate never moved the
    champion, so `champion` stays and the challenger is marked rolled back.

    Any other target's signature is verified with the worker's trusted keys before traffic
    moves: a tampered or wrongly signed target stops the flow with the error, routes and
    aliases untouched.
    """
    endpoints = worker_endpoints()
    has_traffic = endpoints.envoy_admin_url is not None  # a registry-only stack has none
    change = None
    if to_version is None and to_alias == "champion" and has_traffic:
        change = roll_back_traffic(service, endpoints)
        target = change.after.stable
    else:
        target = to_version or resolve_version(service, to_alias, endpoints).version
        if to_version is not None or to_alias != "champion":
            verify_version(service, target, endpoints)
        if has_traffic:
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
