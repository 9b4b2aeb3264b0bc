"""Drive a running Envoy's routes: atomic apply of the route file, verified through the admin.

Routes reach Envoy through filesystem RDS. Envoy's watcher only notices an atomic rename into
the watched folder, and it drops an invalid update silently (the old routes keep serving), so a
change counts as done only once the admin stats show the new version live. The route file is
the source of truth: it carries the `Routes` it was rendered from, and routes survive a restart.

Needs only the Envoy's home folder and admin URL, not the process that runs it (`envoy.py`):
the release steps run in other processes than the one that started Envoy.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import httpx

from canaryflow.contracts import Routes
from canaryflow.dataplane.controller import RouteChange
from canaryflow.dataplane.envoy_config import (
    LOG_FILE,
    ROUTE_CONFIG,
    ROUTE_FILE,
    STAT_PREFIX,
    parse_route_file,
    render_route_config,
    write_atomically,
)
from canaryflow.errors import ConfigError, StackError

_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
_RDS = rf"^http\.{STAT_PREFIX}\.rds\.{ROUTE_CONFIG}\."


class EnvoyAdmin:
    """Envoy's admin stats over one reused client: verification polls every few milliseconds."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self._client: httpx.Client | None = None

    def stats(self, pattern: str) -> dict[str, str]:
        """Stats whose names match the regex `pattern` (counters and text readouts)."""
        if self._client is None:
            self._client = httpx.Client(base_url=self.url, timeout=2.0)
        try:
            response = self._client.get("/stats", params={"filter": pattern})
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise StackError(f"Envoy admin at {self.url} did not answer: {exc}") from exc
        values: dict[str, str] = {}
        for line in response.text.splitlines():
            name, sep, value = line.partition(": ")
            if sep:
                values[name] = value.strip().strip('"')
        return values

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


class EnvoyRoutes:
    """`TrafficController` for the Envoy whose home folder is `home`: write, then confirm live."""

    def __init__(
        self,
        home: Path | str,
        admin_url: str,
        *,
        service: str,
        route_timeout_s: float = 300.0,
        confirm_timeout_s: float = 2.0,
    ) -> None:
        self.home = Path(home)
        self.service = service
        self.route_path = self.home / ROUTE_FILE
        self.log_path = self.home / LOG_FILE
        self.admin = EnvoyAdmin(admin_url)
        self.route_timeout_s = route_timeout_s
        self.confirm_timeout_s = confirm_timeout_s
        self._lock = threading.Lock()
        self._version = 0  # the highest version this object wrote, live or refused

    def read_file(self) -> str | None:
        """The route file's text, None before Envoy was first started: the one place it is read."""
        try:
            return self.route_path.read_text()
        except FileNotFoundError:
            return None

    def create(self, initial: Routes | None) -> None:
        """Before Envoy starts: the routes it boots with, unless a file exists (kept on restart)."""
        self.route_path.parent.mkdir(parents=True, exist_ok=True)
        if not self.route_path.exists():
            text = render_route_config(initial, version=1, route_timeout_s=self.route_timeout_s)
            write_atomically(self.route_path, text)

    def current(self) -> Routes | None:
        """Read from the file each time: another process may have moved traffic since."""
        text = self.read_file()
        return None if text is None else parse_route_file(text, source=self.route_path)[1]

    def set_routes(self, routes: Routes) -> Routes:
        self._check(routes)
        with self._lock:
            previous = self._read_existing()
            version, _ = parse_route_file(previous, source=self.route_path)
            self._apply(routes, previous, version)
        return routes

    def rollback(self) -> RouteChange:
        """Stable-only routes for the stable version in the file now; one read, under the lock."""
        with self._lock:
            previous = self._read_existing()
            version, before = parse_route_file(previous, source=self.route_path)
            if before is None:
                raise StackError(
                    f"nothing to roll back to: no stable version of {self.service!r} is known; "
                    "call set_routes with the stable version first"
                )
            after = Routes(service=before.service, stable=before.stable)
            self._check(after)
            self._apply(after, previous, version)
        return RouteChange(before=before, after=after)

    def live_version(self) -> str | None:
        return self._rds_stats().get("version_text")

    def close(self) -> None:
        self.admin.close()

    def _check(self, routes: Routes) -> None:
        if routes.sticky_header is not None and not _HEADER_NAME.match(routes.sticky_header):
            # Envoy accepts such a name and then never finds the header: refuse it here.
            raise ConfigError(
                f"sticky_header {routes.sticky_header!r} is not a valid HTTP header name; use "
                "letters, digits and dashes, e.g. x-canaryflow-user"
            )
        if routes.service != self.service:
            raise ConfigError(
                f"routes for service {routes.service!r} sent to the Envoy of "
                f"{self.service!r}; each service has its own proxy"
            )

    def _read_existing(self) -> str:
        text = self.read_file()
        if text is None:
            raise StackError(
                f"no route file at {self.route_path}: the Envoy of {self.service!r} was never "
                "started there (start the data plane with `canaryflow up`)"
            )
        return text

    def _apply(self, routes: Routes, previous: str, previous_version: int) -> None:
        """Write `routes` over `previous` (the file's text now); put it back if Envoy refuses."""
        # Another writer may have written the file since: never reuse a live version.
        version = max(self._version, previous_version) + 1
        before = self._rds_stats()
        offset = self._log_size()
        text = render_route_config(routes, version=version, route_timeout_s=self.route_timeout_s)
        write_atomically(self.route_path, text)
        # Versions never repeat, even after a refused update, so a stale stat cannot confirm.
        self._version = version
        try:
            self._confirm(version, before, offset)
        except StackError:
            write_atomically(self.route_path, previous)
            raise

    def _rds_stats(self) -> dict[str, str]:
        stats = self.admin.stats(_RDS + r"(version_text|update_rejected|update_failure)$")
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
                    f"previous routes keep serving; see {self.log_path}"
                )
            time.sleep(0.002)

    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def _reason(self, log_offset: int) -> str:
        """Envoy's own words: the rejection logged after the proto dump of the refused config."""
        for _ in range(10):
            text = self._log_since(log_offset)
            start = text.rfind("rejected")
            if start >= 0:
                lines = text[start:].splitlines()
                detail = next((line[2:] for line in lines if line.startswith(": ")), lines[0])
                return detail if len(detail) <= 400 else "..." + detail[-400:]
            time.sleep(0.02)  # the log line may trail the stat by a moment
        return f"no reason logged; see {self.log_path}"

    def _log_since(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as handle:
                handle.seek(offset)
                return handle.read().decode(errors="replace")
        except FileNotFoundError:
            return ""
