"""The one interface the release flow uses to move live traffic.

Envoy implements it here (`dataplane/envoy_routes.py`); an Istio VirtualService or a Gateway API
HTTPRoute controller would plug in behind the same three calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from canaryflow.contracts import Routes


@dataclass(frozen=True)
class RouteChange:
    """What a rollback moved: the routes live before it (None: none set yet) and after it."""

    before: Routes | None
    after: Routes


@runtime_checkable
class TrafficController(Protocol):
    def set_routes(self, routes: Routes) -> Routes:
        """Apply a split/mirror and return it only once it is verified live."""
        ...

    def rollback(self) -> RouteChange:
        """All traffic to the current stable version in one call, verified like set_routes.

        Returns what was live before as well, read in the same step, so a caller needs no
        `current()` first (which would be a second read, and a race with other writers).
        """
        ...

    def current(self) -> Routes | None:
        """The routes last verified live, or None before any were set."""
        ...
