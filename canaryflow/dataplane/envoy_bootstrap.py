"""The Envoy bootstrap: the static listeners (client, synthetic) and clusters.

Apart from the route file (`envoy_config.py`, rewritten on every traffic move) because it is
written once per process start; what each listener does to a request before the routes run (the
edge rules: headers only Envoy may set, request ids, the body cap) lives here.
"""

from __future__ import annotations

import json
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from canaryflow.dataplane.envoy_config import (
    DEFAULT_MAX_REQUEST_BYTES,
    EDGE_HEADERS,
    PUBLIC_ONLY_HEADERS,
    ROUTE_CONFIG,
    STAT_PREFIX,
    SYNTHETIC_HEADER,
    SYNTHETIC_STAT_PREFIX,
    body_limit_message,
    header_entry,
)
from canaryflow.errors import ConfigError

_BOOTSTRAP = """
node: {id: canaryflow-$service, cluster: canaryflow-$service}
admin: {address: {socket_address: {address: 127.0.0.1, port_value: $admin_port}}}
static_resources: {listeners: [], clusters: []}
"""
_CLUSTER = """
{name: $name, type: STATIC, connect_timeout: 1s, load_assignment: {cluster_name: $name, endpoints:
  [{lb_endpoints: [{endpoint: {address: $address}}]}]}}
"""
# An upstream is a (host, port) pair, or the path of a model service's Unix socket (`serve
# --uds`): cheaper per request than loopback TCP for a service on the same machine.
Upstream = tuple[str, int] | Path


def upstream_address(upstream: Upstream) -> dict[str, Any]:
    """Envoy's address for an upstream: `pipe` for a socket path, else `socket_address`."""
    if isinstance(upstream, Path):
        return {"pipe": {"path": str(upstream)}}
    host, port = upstream
    return {"socket_address": {"address": host, "port_value": port}}


def _status_is(code: int) -> dict[str, Any]:
    value = {"default_value": code, "runtime_key": f"canaryflow.local_reply.{code}"}
    return {"status_code_filter": {"comparison": {"op": "EQ", "value": value}}}


def _connection_manager(max_request_bytes: int, synthetic: bool) -> dict[str, Any]:
    """One listener's HTTP filters: drop the client's edge headers, refuse big bodies, route.

    A declared Content-Length over the cap is denied by RBAC on the headers, before a byte of
    body is read (the buffer filter alone would read up to the cap first and wait for the
    rest); a chunked body is refused by the buffer filter once the cap is passed. Both answers
    are rewritten to one 413 JSON body that never echoes the request. The buffer filter holds
    requests only: streamed responses pass through unbuffered.
    """
    too_big = {
        "name": "content-length",
        "range_match": {"start": max_request_bytes + 1, "end": 2**63 - 1},
    }
    error = {
        "message": body_limit_message(max_request_bytes),
        "type": "request_too_large",
        "code": 413,
    }
    reply = {
        "body": {"inline_string": json.dumps({"error": error})},
        "body_format_override": {
            "text_format": "%LOCAL_REPLY_BODY%",
            "content_type": "application/json",
        },
    }
    mutations: list[dict[str, Any]] = [{"remove": name} for name in EDGE_HEADERS]
    if synthetic:
        mutations.append({"append": header_entry(SYNTHETIC_HEADER, "1")})
    else:  # a user must not pick the role that answers them (`envoy_config.probe_routes`)
        mutations += [{"remove": name} for name in PUBLIC_ONLY_HEADERS]
    return {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager"
        ".v3.HttpConnectionManager",
        "stat_prefix": SYNTHETIC_STAT_PREFIX if synthetic else STAT_PREFIX,
        # Every peer is external (no address is trusted as internal), so Envoy replaces any
        # client x-request-id with its own; mirrored copies reuse the primary's.
        "generate_request_id": True,
        "preserve_external_request_id": False,
        "use_remote_address": True,
        "internal_address_config": {
            "cidr_ranges": [{"address_prefix": "255.255.255.255", "prefix_len": 32}]
        },
        "local_reply_config": {
            "mappers": [
                {
                    "filter": {
                        "and_filter": {
                            "filters": [_status_is(403), {"header_filter": {"header": too_big}}]
                        }
                    },
                    "status_code": 413,
                    **reply,
                },
                {"filter": _status_is(413), **reply},
            ]
        },
        # The same edits before the route is picked: the header_mutation filter runs after
        # Envoy chose (and cached) the route, so routes matching on an edge header (the probe
        # routes) would otherwise see the client's copy.
        "early_header_mutation_extensions": [
            {
                "name": "envoy.http.early_header_mutation.header_mutation",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.http.early_header_mutation"
                    ".header_mutation.v3.HeaderMutation",
                    "mutations": mutations,
                },
            }
        ],
        "rds": {},  # filled by render_bootstrap
        "http_filters": [
            {
                "name": "envoy.filters.http.header_mutation",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation"
                    ".v3.HeaderMutation",
                    "mutations": {"request_mutations": mutations},
                },
            },
            {
                "name": "envoy.filters.http.rbac",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
                    "rules": {
                        "action": "DENY",
                        "policies": {
                            "body-over-limit": {
                                "permissions": [{"header": too_big}],
                                "principals": [{"any": True}],
                            }
                        },
                    },
                },
            },
            {
                "name": "envoy.filters.http.buffer",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
                    "max_request_bytes": max_request_bytes,
                },
            },
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            },
        ],
    }


def render_bootstrap(
    *,
    service: str,
    listen_host: str,
    listen_port: int,
    admin_port: int,
    upstreams: Mapping[str, Upstream],
    route_path: Path,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    synthetic_port: int | None = None,
) -> dict[str, Any]:
    """Static listeners and clusters; the routes come from the watched file.

    The synthetic listener (on loopback only, when `synthetic_port` is given) shares the client
    listener's routes and marks every request it takes as synthetic traffic; the probe routes
    in them match only requests so marked, and the client listener drops the probe target.
    """
    if max_request_bytes < 1:
        raise ConfigError(f"max_request_bytes must be at least 1, got {max_request_bytes}")
    values = {"service": service, "admin_port": admin_port}
    bootstrap: dict[str, Any] = yaml.safe_load(
        string.Template(_BOOTSTRAP).substitute({k: json.dumps(v) for k, v in values.items()})
    )
    rds = {
        "route_config_name": ROUTE_CONFIG,
        "config_source": {
            "resource_api_version": "V3",
            "path_config_source": {
                "path": str(route_path),
                "watched_directory": {"path": str(route_path.parent)},
            },
        },
    }
    listeners = [("client", listen_host, listen_port, False)]
    if synthetic_port is not None:
        listeners.append(("synthetic", "127.0.0.1", synthetic_port, True))
    for name, host, port, synthetic in listeners:
        manager = _connection_manager(max_request_bytes, synthetic)
        manager["rds"] = rds
        bootstrap["static_resources"]["listeners"].append(
            {
                "name": name,
                "address": {"socket_address": {"address": host, "port_value": port}},
                "filter_chains": [
                    {
                        "filters": [
                            {
                                "name": "envoy.filters.network.http_connection_manager",
                                "typed_config": manager,
                            }
                        ]
                    }
                ],
            }
        )
    bootstrap["static_resources"]["clusters"] = [
        yaml.safe_load(
            string.Template(_CLUSTER).substitute(
                name=json.dumps(name), address=json.dumps(upstream_address(upstream))
            )
        )
        for name, upstream in upstreams.items()
    ]
    return bootstrap
