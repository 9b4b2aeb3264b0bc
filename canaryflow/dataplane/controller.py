"""The one interface the release flow uses to move live traffic, and the rules every write obeys.

Envoy implements it here (`dataplane/envoy_routes.py`); an Istio VirtualService or a Gateway API
HTTPRoute controller would plug in behind the same three calls.

Which way a write moves traffic decides what a controller may do when the data plane does not
confirm it (`is_retreat`):

- A **forward** move gives a candidate (the canary or the shadow) more traffic, or promotes one
  to stable. If the data plane refuses it, or does not confirm it in time, the controller puts
  the previous routes back (a move away from the candidate) and raises.
- A **retreat** gives no candidate more traffic: `rollback()`, a `set_routes` that lowers the
  canary's weight or the mirror, or one that sends all traffic to a version that is not a
  candidate now (on-call's "route all to version X"). A retreat never puts the previous routes
  back when it is not confirmed: that would send traffic back toward the candidate the moment
  the data plane catches up. It keeps its routes in place and retries confirming until a
  deadline, then raises `RollbackUnconfirmed`, which says the routes are in place.
  The one exception, for `set_routes` only: when the data plane explicitly *refuses* the new
  routes (invalid, e.g. a version that is not a valid header value), they can never go live;
  the previous routes, still serving, are put back so that what is written is what serves,
  and the refusal is raised at once. `rollback()` never puts anything back, whatever the data
  plane says: its routes are the stable version that was serving already.
- Writers are serialised, and a retreat wins: a `set_routes` from a writer that has not seen
  the latest retreat (its own last write is older) may not give the versions that retreat
  took traffic from any traffic back, not even as the new stable (`RoutesChanged`, nothing
  written). So a rollback concurrent with a canary step, or with a promotion, ends on stable.
  A writer that has written nothing yet (a new release, a new process) starts from the file
  as it is; traffic to a version the retreat did not name (a new candidate) ends the fence.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from canaryflow.contracts import RouteChange, Routes


@runtime_checkable
class TrafficController(Protocol):
    def set_routes(self, routes: Routes) -> Routes:
        """Apply a split/mirror and return it only once it is verified live.

        A forward move that is refused or not confirmed is undone before the error is raised;
        a retreat is never undone (see the module's docstring) and raises
        `RollbackUnconfirmed` when its deadline passes.
        """
        ...

    def rollback(self) -> RouteChange:
        """All traffic to the current stable version in one call, verified like set_routes.

        Returns what was live before as well, read in the same step, so a caller needs no
        `current()` first (which would be a second read, and a race with other writers).
        Never restores the previous routes; raises `RollbackUnconfirmed` (the stable-only
        routes are in place) if the data plane does not confirm them before the deadline.
        """
        ...

    def current(self) -> Routes | None:
        """The routes last verified live, or None before any were set."""
        ...


def _exposure(routes: Routes | None) -> dict[tuple[str, str], float]:
    """Percent of live ("serve") and mirrored ("mirror") traffic each version gets."""
    if routes is None:
        return {}
    canary = routes.weight if routes.canary is not None else 0.0
    shares = {("serve", routes.stable): 100.0 - canary}
    if routes.canary is not None and canary > 0:
        key = ("serve", routes.canary)
        shares[key] = shares.get(key, 0.0) + canary
    if routes.shadow is not None and routes.mirror_percent > 0:
        shares[("mirror", routes.shadow)] = routes.mirror_percent
    return shares


def gains(before: Routes | None, after: Routes) -> set[str]:
    """Versions `after` gives more live or mirrored traffic than `before` does."""
    old, new = _exposure(before), _exposure(after)
    return {
        version for (kind, version), share in new.items() if share > old.get((kind, version), 0)
    }


def losses(before: Routes | None, after: Routes) -> set[str]:
    """Versions `after` gives less live or mirrored traffic than `before` does."""
    old, new = _exposure(before), _exposure(after)
    return {
        version for (kind, version), share in old.items() if share > new.get((kind, version), 0)
    }


def is_retreat(before: Routes | None, after: Routes) -> bool:
    """True when `after` moves no traffic toward a candidate of `before` (see the module doc).

    With the same stable version: no version but the stable gains traffic. With another stable
    version: all traffic goes to it and it is not a candidate now (a promotion, the canary or
    shadow becoming stable, is a forward move). No routes before: forward.
    """
    if before is None:
        return False
    gained = gains(before, after)
    if after.stable == before.stable:
        return gained <= {after.stable}
    candidates = {v for v in (before.canary, before.shadow) if v is not None}
    return set(_exposure(after)) == {("serve", after.stable)} and after.stable not in candidates
