"""Registry steps: publish the candidate, then promote it or mark it rolled back."""

from __future__ import annotations

from pathlib import Path

from canaryflow import connections, runbook
from canaryflow.contracts import Endpoints, PublishedVersion, ReleaseSpec, Status
from canaryflow.errors import AliasNotFound
from canaryflow.registry.signing import load_trusted_keys
from tasks.common import step


@step()
def publish_candidate(spec: ReleaseSpec, endpoints: Endpoints) -> PublishedVersion:
    """Idempotent on the manifest digest; the version becomes the `challenger`."""
    return runbook.publish(spec, endpoints)


@step()
def promote_candidate(service: str, version: str, endpoints: Endpoints) -> str | None:
    """`champion` moves to the candidate; the old champion stays as `last-stable`."""
    return connections.registry(endpoints.mlflow_uri).promote(service, version)


@step()
def mark_rolled_back(service: str, version: str, reason: str, endpoints: Endpoints) -> None:
    connections.registry(endpoints.mlflow_uri).rollback(service, version, reason)


@step()
def set_status(service: str, version: str, status: Status, endpoints: Endpoints) -> None:
    connections.registry(endpoints.mlflow_uri).set_status(service, version, status)


@step()
def retire_challenger(service: str, reason: str, endpoints: Endpoints) -> str | None:
    """The candidate a silent canary left behind: marked rolled back, `challenger` removed.
    Returns its version, or None when no version is challenging."""
    return runbook.retire_challenger(endpoints, service, reason)


@step()
def resolve_version(service: str, alias: str, endpoints: Endpoints) -> PublishedVersion:
    return connections.registry(endpoints.mlflow_uri).resolve(service, alias)


@step()
def verify_version(service: str, version: str, endpoints: Endpoints) -> PublishedVersion:
    """The version as stored, refused (SignatureError, UnknownKeyError) unless its manifest is
    unchanged since publishing, signed by a key the worker trusts (`endpoints.keys_dir`) and
    that key is bound to the service. Not retried: a bad signature stays bad."""
    trusted = load_trusted_keys(Path(endpoints.keys_dir))
    return connections.registry(endpoints.mlflow_uri).get(service, version, verify_with=trusted)


@step()
def restore_champion(service: str, target: str | None, reason: str, endpoints: Endpoints) -> str:
    """`champion` goes back to the target (default `last-stable`); returns its version."""
    return connections.registry(endpoints.mlflow_uri).rollback_to(service, target, reason)


@step()
def resolve_champion_and_reference(
    service: str, endpoints: Endpoints
) -> tuple[PublishedVersion, PublishedVersion]:
    """The champion and its reference; before any promotion the champion is its own reference."""
    registry = connections.registry(endpoints.mlflow_uri)
    champion = registry.resolve(service, "champion")
    try:
        reference = registry.resolve(service, "last-stable")
    except AliasNotFound:
        reference = champion  # first release: the champion against itself measures noise alone
    return champion, reference
