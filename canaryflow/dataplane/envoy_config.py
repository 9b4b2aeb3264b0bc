"""What Envoy is told: the bootstrap and the RDS route file, rendered, read back, replaced.

Kept apart from the process (`envoy.py`) and the route driver (`envoy_routes.py`): rendering
needs no running Envoy. Both find their files in an Envoy's home folder by the names below.

Contract with the model service: every request carries `x-canaryflow-role` and
`x-canaryflow-version` set by Envoy for the weighted cluster it picked. While a shadow is set,
every request carries `x-canaryflow-shadow-version`; mirrored copies alone carry
`x-canaryflow-mirror: 1` (and `-shadow` appended to the Host; the primary Host is rewritten to
the service name). Requests through the loopback synthetic listener carry
`x-canaryflow-synthetic: 1`; there alone, `x-canaryflow-probe-target: stable|canary|shadow`
sends a probe (`probe_routes`) straight to that role's cluster, never mirrored. Every listener
first drops the client's own copies of these headers (`EDGE_HEADERS`), before the route is
picked, so only Envoy can set them; the public listener also drops the probe target
(`PUBLIC_ONLY_HEADERS`), so users cannot steer themselves to a role. Envoy makes each request's
`x-request-id` itself (a client's is replaced: it would let one record overwrite another); a
mirrored copy keeps its primary's. A body over the cap is answered 413 at the edge: a
Content-Length over it before any body is read, a chunked body once the cap is passed.
`POST /v1/feedback` (users' ratings) goes to the stable cluster alone, with no role headers and
no mirror.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from canaryflow.contracts import Routes
from canaryflow.errors import StackError

ROUTE_CONFIG = "canaryflow"
STAT_PREFIX = "ingress"
SYNTHETIC_STAT_PREFIX = "synthetic"
ROLE_HEADER = "x-canaryflow-role"
VERSION_HEADER = "x-canaryflow-version"
SHADOW_VERSION_HEADER = "x-canaryflow-shadow-version"
MIRROR_HEADER = "x-canaryflow-mirror"
SYNTHETIC_HEADER = "x-canaryflow-synthetic"
# Set by Envoy only: a client's copy is dropped on every listener before the routes run.
EDGE_HEADERS = (ROLE_HEADER, VERSION_HEADER, SHADOW_VERSION_HEADER, MIRROR_HEADER, SYNTHETIC_HEADER)
PROBE_TARGET_HEADER = "x-canaryflow-probe-target"
# Dropped by the public listener only: the synthetic listener's probes name their target role.
PUBLIC_ONLY_HEADERS = (PROBE_TARGET_HEADER,)
DEFAULT_MAX_REQUEST_BYTES = 1024 * 1024
FEEDBACK_PATH = "/v1/feedback"  # users' ratings: to the stable cluster only (`feedback_route`)
CLUSTERS = ("stable", "canary", "shadow")
# Inside an Envoy's home: Envoy watches the route file's own folder, so it gets one to itself.
ROUTE_FILE = Path("routes") / "routes.yaml"
# Beside the route file: the writers' lock (held for read, write and confirm) and the flag a
# waiting rollback holds so that no new forward write starts before it. Envoy reloads on a
# rename into the folder only; creating or locking these files does not touch its routes.
LOCK_FILE = Path("routes") / "routes.yaml.lock"
ROLLBACK_FLAG_FILE = Path("routes") / "routes.yaml.rollback"
LOG_FILE = Path("envoy.log")
_ROUTES_MARK = "# canaryflow-routes: "
_BASIS = 10_000  # weights in hundredths of a percent


def header_entry(name: str, value: str) -> dict[str, Any]:
    return {
        "header": {"key": name, "value": value},
        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
    }


def _cluster_weight(role: str, version: str, weight: int) -> dict[str, Any]:
    return {
        "name": role,
        "weight": weight,
        "request_headers_to_add": [
            header_entry(ROLE_HEADER, role),
            header_entry(VERSION_HEADER, version),
        ],
    }


@dataclass(frozen=True)
class Fence:
    """The latest move of traffic away from candidate versions (a rollback, or a `set_routes`
    that lowers a candidate's share), written at routes version `version` by `by`.

    A writer that has not seen that move (its own last write is older) may not give any of
    `versions` more traffic again: a rollback wins over a canary step that raced it. Forward
    writes carry the fence on until one gives traffic to a version it does not name (a new
    release took over).
    """

    version: int
    versions: tuple[str, ...]
    by: str = ""


@dataclass(frozen=True)
class RouteMark:
    """What a route file says about itself: its version, the routes and the fence."""

    version: int
    routes: Routes | None
    fence: Fence | None = None


def feedback_route(service: str, timeout_s: float) -> dict[str, Any]:
    """Users' ratings to the stable cluster alone, never mirrored or split: a rating is joined
    to its answer by request id in the shared store, so any instance can write it, and a copy
    to the shadow would only write it twice. Ahead of the catch-all route (first match wins)."""
    return {
        "match": {"path": FEEDBACK_PATH},
        "route": {
            "cluster": "stable",
            "host_rewrite_literal": service,
            "timeout": f"{timeout_s:.3f}s",
        },
    }


def probe_routes(routes: Routes, timeout_s: float) -> list[dict[str, Any]]:
    """One route per role with a version: a probe (synthetic, naming that role) goes to its
    cluster with the role and version headers a split would set, and is never mirrored, so a
    labelled query is answered by the role it is scored for. Matching on the synthetic mark as
    well as the target keeps users off these routes even if an edge rule were missing."""
    versions = {"stable": routes.stable, "canary": routes.canary, "shadow": routes.shadow}
    return [
        {
            "match": {
                "prefix": "/",
                "headers": [
                    {"name": SYNTHETIC_HEADER, "string_match": {"exact": "1"}},
                    {"name": PROBE_TARGET_HEADER, "string_match": {"exact": role}},
                ],
            },
            "request_headers_to_add": [
                header_entry(ROLE_HEADER, role),
                header_entry(VERSION_HEADER, version),
            ],
            "route": {
                "cluster": role,
                "host_rewrite_literal": routes.service,
                "timeout": f"{timeout_s:.3f}s",
            },
        }
        for role, version in versions.items()
        if version is not None
    ]


def render_route_config(
    routes: Routes | None,
    *,
    version: int,
    route_timeout_s: float = 300.0,
    fence: Fence | None = None,
) -> str:
    """The RDS file for `routes` (None: answer 503 until the first routes are set)."""
    route: dict[str, Any] = {"match": {"prefix": "/"}}
    first: list[dict[str, Any]] = []
    if routes is None:
        route["direct_response"] = {
            "status": 503,
            "body": {"inline_string": "canaryflow: no routes set yet; call set_routes\n"},
        }
    else:
        canary_weight = round(routes.weight * _BASIS / 100) if routes.canary else 0
        clusters = []
        if canary_weight < _BASIS:
            clusters.append(_cluster_weight("stable", routes.stable, _BASIS - canary_weight))
        if routes.canary is not None and canary_weight > 0:
            clusters.append(_cluster_weight("canary", routes.canary, canary_weight))
        weighted: dict[str, Any] = {"clusters": clusters}
        action: dict[str, Any] = {
            "weighted_clusters": weighted,
            "host_rewrite_literal": routes.service,
            "timeout": f"{route_timeout_s:.3f}s",
        }
        if routes.sticky_header:
            weighted["use_hash_policy"] = True
            action["hash_policy"] = [{"header": {"header_name": routes.sticky_header}}]
        if routes.shadow is not None:
            route["request_headers_to_add"] = [header_entry(SHADOW_VERSION_HEADER, routes.shadow)]
            if routes.mirror_percent > 0:
                action["request_mirror_policies"] = [
                    {
                        "cluster": "shadow",
                        # The copy alone: the primary never carries it (checked in tests).
                        "request_headers_mutations": [{"append": header_entry(MIRROR_HEADER, "1")}],
                        "runtime_fraction": {
                            "default_value": {
                                "numerator": round(routes.mirror_percent * 10_000),
                                "denominator": "MILLION",
                            }
                        },
                    }
                ]
        else:
            route["request_headers_to_remove"] = [SHADOW_VERSION_HEADER]
        route["route"] = action
        first.append(feedback_route(routes.service, route_timeout_s))
        first.extend(probe_routes(routes, route_timeout_s))
    document = {
        "version_info": str(version),
        "resources": [
            {
                "@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
                "name": ROUTE_CONFIG,
                "virtual_hosts": [{"name": "service", "domains": ["*"], "routes": [*first, route]}],
            }
        ],
    }
    # JSON is valid YAML and far cheaper to write than PyYAML's emitter; the comment line carries
    # what the file was rendered from, so reading it back needs no YAML parse either.
    mark: dict[str, Any] = {
        "version": version,
        "routes": routes.model_dump(mode="json") if routes else None,
    }
    if fence is not None:
        mark["fence"] = {"version": fence.version, "versions": list(fence.versions), "by": fence.by}
    return f"{_ROUTES_MARK}{json.dumps(mark)}\n{json.dumps(document, indent=1)}\n"


def read_route_file(path: Path) -> tuple[int, Routes | None]:
    """The version and the `Routes` a route file was rendered from."""
    return parse_route_file(path.read_text(), source=path)


def parse_route_file(text: str, *, source: Path | str = "route file") -> tuple[int, Routes | None]:
    mark = parse_route_mark(text, source=source)
    return mark.version, mark.routes


def parse_route_mark(text: str, *, source: Path | str = "route file") -> RouteMark:
    """The mark line of a route file; a StackError (never a parse error) for anything else."""
    first = text.split("\n", 1)[0]
    if not first.startswith(_ROUTES_MARK):
        raise StackError(f"{source} was not written by canaryflow; delete it to start afresh")
    try:
        mark = json.loads(first[len(_ROUTES_MARK) :])
        routes = Routes.model_validate(mark["routes"]) if mark["routes"] else None
        raw = mark.get("fence")
        fence = (
            Fence(int(raw["version"]), tuple(str(v) for v in raw["versions"]), str(raw["by"]))
            if raw
            else None
        )
        return RouteMark(int(mark["version"]), routes, fence)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:  # pydantic: ValueError
        raise StackError(
            f"{source} has a damaged canaryflow mark ({type(exc).__name__}: {exc}); route all "
            "traffic to a named version (`canaryflow rollback SERVICE --to VERSION`) to rewrite it"
        ) from exc


def write_atomically(path: Path, text: str) -> None:
    """Temp file in the same folder, fsync, rename: the only change Envoy's watcher sees."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".routes-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def body_limit_message(max_request_bytes: int) -> str:
    """What a client whose body is over the cap is told: the cap and who can raise it."""
    return (
        f"request body over the limit of {max_request_bytes} bytes: send a smaller request, or "
        "ask the operator to raise the limit (canaryflow up --max-body-bytes N; "
        "canaryflow serve --max-body-bytes N)"
    )
