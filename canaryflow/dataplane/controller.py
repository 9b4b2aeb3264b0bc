"""The one interface the release flow uses to move live traffic.

Envoy implements it here (`dataplane/envoy.py`); an Istio VirtualService or a Gateway API
HTTPRoute controller would plug in behind the same three calls.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from canaryflow.contracts import Routes


@runtime_checkable
class TrafficController(Protocol):
    def set_routes(self, routes: Routes) -> Routes:
        """Apply a split/mirror and return it only once it is verified live."""
        ...

    def rollback(self) -> Routes:
        """Send all traffic to the current stable version in one call; verified like set_routes."""
        ...

    def current(self) -> Routes | None:
        """The routes last verified live, or None before any were set."""
        ...
