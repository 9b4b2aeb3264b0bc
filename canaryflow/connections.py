"""One client per external system and endpoint, made on first use and reused by every step."""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

from canaryflow.contracts import Endpoints
from canaryflow.errors import StackError

if TYPE_CHECKING:
    from canaryflow.dataplane.controller import TrafficController
    from canaryflow.dataplane.store import Store
    from canaryflow.registry.ledger import ReleaseLedger
    from canaryflow.registry.versions import MlflowRegistry


@lru_cache(maxsize=8)
def registry(tracking_uri: str) -> MlflowRegistry:
    from canaryflow.registry.versions import MlflowRegistry

    return MlflowRegistry(tracking_uri)


@lru_cache(maxsize=8)
def ledger(tracking_uri: str) -> ReleaseLedger:
    from canaryflow.registry.ledger import ReleaseLedger

    return ReleaseLedger(tracking_uri)


@lru_cache(maxsize=8)
def store(url: str) -> Store:
    from canaryflow.dataplane.store import Store

    return Store(url)


def traffic_controller(endpoints: Endpoints, service: str) -> TrafficController:
    """The Envoy in front of `service`, driven through its route file and admin port."""
    if endpoints.envoy_home is None or endpoints.envoy_admin_url is None:
        raise StackError(
            f"no traffic controller for {service!r}: the data plane is not running "
            "(start it with `canaryflow up`, or give the release endpoints with envoy_home and "
            "envoy_admin_url)"
        )
    return _envoy_controller(endpoints.envoy_home, endpoints.envoy_admin_url, service)


@lru_cache(maxsize=8)
def _envoy_controller(home: str, admin_url: str, service: str) -> TrafficController:
    """One per Envoy and service: its lock orders this process's writes to that route file."""
    from canaryflow.dataplane.envoy_routes import EnvoyRoutes

    return EnvoyRoutes(home, admin_url, service=service)
