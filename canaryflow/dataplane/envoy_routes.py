"""Drive a running Envoy's routes: atomic apply of the route file, verified through the admin.

Routes reach Envoy through filesystem RDS. Envoy's watcher only notices an atomic rename into
the watched folder, and it drops an invalid update silently (the old routes keep serving), so a
change counts as done only once the admin stats show the new version live. The route file is
the source of truth: it carries the `Routes` it was rendered from, and routes survive a restart.
Envoy reloads the file by itself, whether or not its admin answers.

Writers in any process are serialised by an exclusive `flock` on a lock file beside the route
file, held for read, write and confirm; the file's `version_info` only grows. A rollback (and
any retreat, see `controller.py`) first raises a flag that keeps new forward writes from
starting, so it waits for at most the one write in flight; it never puts the previous routes
back and keeps confirming until `rollback_timeout_s`. A forward write from a controller that has
not seen the latest retreat may not give its versions traffic back (`RoutesChanged`).

Needs only the Envoy's home folder and admin URL, not the process that runs it (`envoy.py`):
the release steps run in other processes than the one that started Envoy.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path

import httpx

from canaryflow.contracts import RouteChange, Routes
from canaryflow.dataplane.controller import gains, is_retreat, losses
from canaryflow.dataplane.envoy_config import (
    LOCK_FILE,
    LOG_FILE,
    ROLLBACK_FLAG_FILE,
    ROUTE_CONFIG,
    ROUTE_FILE,
    STAT_PREFIX,
    Fence,
    RouteMark,
    parse_route_mark,
    render_route_config,
    write_atomically,
)
from canaryflow.errors import (
    ConfigError,
    RollbackUnconfirmed,
    RoutesBusy,
    RoutesChanged,
    StackError,
)

log = logging.getLogger("canaryflow.dataplane")

_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
_RDS = rf"^http\.{STAT_PREFIX}\.rds\.{ROUTE_CONFIG}\."
_VERSION_INFO = re.compile(r'"version_info":\s*"(\d+)"')
_REJECTED = "config update rejected"  # Envoy's log line for a route file it refused


class EnvoyAdmin:
    """Envoy's admin stats over one reused client: verification polls every few milliseconds."""

    def __init__(self, url: str, timeout_s: float = 2.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._client: httpx.Client | None = None

    def stats(self, pattern: str, *, timeout_s: float | None = None) -> dict[str, str]:
        """Stats whose names match the regex `pattern` (counters and text readouts)."""
        if self._client is None:
            # Plain HTTP on loopback: skipping the CA bundle makes the client ~1 ms, not ~50.
            self._client = httpx.Client(
                base_url=self.url, timeout=self.timeout_s, verify=self.url.startswith("https:")
            )
        try:
            response = self._client.get(
                "/stats",
                params={"filter": pattern},
                timeout=self.timeout_s if timeout_s is None else timeout_s,
            )
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise StackError(
                f"Envoy admin at {self.url} did not answer: {type(exc).__name__} {exc}"
            ) from exc
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


class _Outcome(Enum):
    LIVE = "live"
    REFUSED = "refused"
    UNCONFIRMED = "unconfirmed"


class EnvoyRoutes:
    """`TrafficController` for the Envoy whose home folder is `home`: write, then confirm live.

    `confirm_timeout_s` bounds one confirmation (a forward move gets one); a retreat retries,
    re-writing its routes with a new version each time, until `rollback_timeout_s`. A write
    waits up to `lock_timeout_s` for the routes lock; a retreat still waiting then writes
    without it (a hung writer must not keep traffic on a candidate). `admin_timeout_s` bounds
    each admin request.
    """

    def __init__(
        self,
        home: Path | str,
        admin_url: str,
        *,
        service: str,
        route_timeout_s: float = 300.0,
        confirm_timeout_s: float = 2.0,
        rollback_timeout_s: float = 30.0,
        lock_timeout_s: float = 10.0,
        admin_timeout_s: float = 2.0,
    ) -> None:
        self.home = Path(home)
        self.service = service
        self.route_path = self.home / ROUTE_FILE
        self.lock_path = self.home / LOCK_FILE
        self.flag_path = self.home / ROLLBACK_FLAG_FILE
        self.log_path = self.home / LOG_FILE
        self.admin = EnvoyAdmin(admin_url, admin_timeout_s)
        self.route_timeout_s = route_timeout_s
        self.confirm_timeout_s = confirm_timeout_s
        self.rollback_timeout_s = rollback_timeout_s
        self.lock_timeout_s = lock_timeout_s
        self._version = 0  # the highest version this object wrote, live or refused
        self._basis: int | None = None  # the file's version after this object's last write
        self._me = f"pid {os.getpid()} on {socket.gethostname()}"

    def read_file(self) -> str | None:
        """The route file's text, None before Envoy was first started: the one place it is read."""
        try:
            return self.route_path.read_text()
        except FileNotFoundError:
            return None

    def create(self, initial: Routes | None) -> None:
        """Before Envoy starts: the routes it boots with, unless a file exists (kept on restart)."""
        if self.route_path.exists():
            return  # no lock: a rollback may hold it while it waits for this Envoy to start
        self.route_path.parent.mkdir(parents=True, exist_ok=True)
        with self._writing("create", retreat=False):
            if not self.route_path.exists():
                text = render_route_config(initial, version=1, route_timeout_s=self.route_timeout_s)
                write_atomically(self.route_path, text)

    def current(self) -> Routes | None:
        """Read from the file each time: another process may have moved traffic since."""
        text = self.read_file()
        return None if text is None else parse_route_mark(text, source=self.route_path).routes

    def current_version(self) -> int | None:
        """The route file's version now (None: no file): pass it as `expected_version`."""
        text = self.read_file()
        return None if text is None else parse_route_mark(text, source=self.route_path).version

    @property
    def last_version(self) -> int | None:
        """The routes version of this controller's last write (None: it wrote none yet)."""
        return self._basis

    def set_routes(self, routes: Routes, *, expected_version: int | None = None) -> Routes:
        """Write `routes` and return them once live (see `controller.py` for what a failure
        leaves in place). `expected_version`: compare-and-swap, refused with `RoutesChanged`
        unless the file is still at that version."""
        self._check(routes)
        peek = self._peek(routes)
        with self._writing("set_routes", retreat=peek) as locked:
            text = self._read_existing()
            try:
                mark = parse_route_mark(text, source=self.route_path)
                damaged = False
            except StackError:
                if set(gains(None, routes)) != {routes.stable}:
                    raise  # only "all traffic to one version" may overwrite a damaged file
                mark, damaged = RouteMark(_lenient_version(text), None), True
            if expected_version is not None and mark.version != expected_version:
                raise RoutesChanged(
                    f"routes of {self.service!r} are at version {mark.version}, not "
                    f"{expected_version}: another writer moved them; read them again"
                )
            self._refuse_if_fenced(mark, routes)  # forward or not: a promotion is "all to v2"
            if damaged or is_retreat(mark.routes, routes):
                self._retreat(mark, routes, kind="set_routes", locked=locked, restore=not damaged)
            else:
                self._advance(mark, routes)
        return routes

    def rollback(self) -> RouteChange:
        """Stable-only routes for the stable version in the file now; one read, under the lock.

        Never puts the previous routes back: retries until Envoy confirms or
        `rollback_timeout_s` passes, then raises `RollbackUnconfirmed` (the routes are written).
        """
        with self._writing("rollback", retreat=True) as locked:
            previous = self._read_existing()
            mark = parse_route_mark(previous, source=self.route_path)
            before = mark.routes
            if before is None:
                raise StackError(
                    f"nothing to roll back to: no stable version of {self.service!r} is known; "
                    "call set_routes with the stable version first"
                )
            after = Routes(service=before.service, stable=before.stable)
            self._check(after)
            self._retreat(mark, after, kind="rollback", locked=locked, restore=False)
        return RouteChange(before=before, after=after)

    def live_version(self) -> str | None:
        return self._rds_stats().get("version_text")

    def close(self) -> None:
        self.admin.close()

    # ---- checks -----------------------------------------------------------------------------

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

    def _peek(self, routes: Routes) -> bool:
        """Whether `routes` look like a retreat from the file now (read without the lock: it
        only picks how to wait for the lock; the decision is taken again under it)."""
        text = self.read_file()
        try:
            return text is not None and is_retreat(parse_route_mark(text).routes, routes)
        except StackError:
            return True

    def _refuse_if_fenced(self, mark: RouteMark, routes: Routes) -> None:
        fence = mark.fence
        if fence is None or self._basis is None or fence.version <= self._basis:
            return
        again = sorted(gains(mark.routes, routes) & set(fence.versions))
        if again:
            raise RoutesChanged(
                f"routes of {self.service!r} were moved off version(s) {', '.join(again)} at "
                f"routes version {fence.version} ({fence.by}), after this controller's last "
                f"write (version {self._basis}); a rollback wins: this write would send them "
                "traffic again, so nothing was written. Start a new release to try again."
            )

    def _read_existing(self) -> str:
        text = self.read_file()
        if text is None:
            raise self._missing()
        return text

    def _missing(self) -> StackError:
        return StackError(
            f"no route file at {self.route_path}: the Envoy of {self.service!r} was never "
            "started there (start the data plane with `canaryflow up`)"
        )

    def _write(self, text: str) -> None:
        try:
            write_atomically(self.route_path, text)
        except OSError as exc:
            raise StackError(
                f"cannot write the route file {self.route_path}: {exc}; it was not changed, so "
                "Envoy serves what it served (check the folder's space and permissions)"
            ) from exc

    def _file_version(self, default: int) -> int:
        text = self.read_file()
        return default if text is None else _lenient_version(text, default)

    # ---- the lock ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _writing(self, kind: str, *, retreat: bool) -> Iterator[bool]:
        """Hold the routes lock; yields False for a retreat that had to go on without it.

        A retreat holds the rollback flag (shared) from before it waits until it is done; a
        forward writer takes the lock only while it can take the flag exclusively, so once a
        retreat waits, no new forward write starts: the retreat waits for one write at most.
        """
        if not self.route_path.parent.is_dir():
            raise self._missing()
        try:
            lock = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                flag = os.open(self.flag_path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError:
                os.close(lock)
                raise
        except OSError as exc:
            if not retreat:
                raise StackError(f"cannot open the routes lock {self.lock_path}: {exc}") from exc
            log.warning(
                "%s: no routes lock (%s); writing the %s without it", self.service, exc, kind
            )
            yield False
            return
        held = False
        try:
            deadline = time.monotonic() + self.lock_timeout_s
            if retreat:
                _poll(lambda: _try(flag, fcntl.LOCK_SH), deadline)
            held = _poll(lambda: self._take(lock, flag, retreat), deadline)
            if held:
                os.ftruncate(lock, 0)
                os.write(lock, f"{self._me} ({kind}) at {time.time():.3f}\n".encode())
            elif retreat:
                log.warning(
                    "%s: routes lock held by %s for over %g s; writing the %s without it",
                    self.service,
                    self._holder(),
                    self.lock_timeout_s,
                    kind,
                )
            else:
                raise RoutesBusy(
                    f"the routes of {self.service!r} are being written by {self._holder()}; "
                    f"waited {self.lock_timeout_s:g} s for {self.lock_path}"
                )
            yield held
        finally:
            os.close(lock)  # closing the descriptors releases both locks
            os.close(flag)

    @staticmethod
    def _take(lock: int, flag: int, retreat: bool) -> bool:
        if retreat:
            return _try(lock, fcntl.LOCK_EX)
        if not _try(flag, fcntl.LOCK_EX):
            return False  # a retreat is waiting: let it go first
        try:
            return _try(lock, fcntl.LOCK_EX)
        finally:
            fcntl.flock(flag, fcntl.LOCK_UN)

    def _holder(self) -> str:
        try:
            return self.lock_path.read_text().strip() or "another writer"
        except OSError:
            return "another writer"

    # ---- forward: one confirmation, the previous routes back if it fails ----------------------

    def _advance(self, mark: RouteMark, routes: Routes) -> None:
        before = self._rds_stats()  # no admin, no forward move: nothing is written
        offset = self._log_size()
        version = max(self._version, mark.version) + 1
        fence = mark.fence
        if fence is not None and gains(mark.routes, routes) - set(fence.versions):
            fence = None  # traffic to a version the fence does not name: a new release took over
        text = render_route_config(
            routes, version=version, route_timeout_s=self.route_timeout_s, fence=fence
        )
        if self._file_version(mark.version) != mark.version:  # only a forced retreat gets here
            raise RoutesChanged(f"routes of {self.service!r} were rolled back meanwhile")
        self._write(text)
        # Versions never repeat, even after a refused update, so a stale stat cannot confirm.
        self._version = version
        try:
            self._confirm(version, before, offset)
        except StackError:
            self._put_back(mark, version)
            raise
        self._basis = version

    def _put_back(self, mark: RouteMark, version: int) -> None:
        """The previous routes again, with a newer version (versions only grow), unless another
        writer has replaced ours meanwhile."""
        if self._file_version(version) != version:
            log.warning("%s: routes changed by another writer; not put back", self.service)
            return
        restored = version + 1
        text = render_route_config(
            mark.routes, version=restored, route_timeout_s=self.route_timeout_s, fence=mark.fence
        )
        self._write(text)
        self._version = self._basis = restored

    # ---- retreat: never put back, confirm until the deadline -----------------------------------

    def _retreat(
        self, mark: RouteMark, routes: Routes, *, kind: str, locked: bool, restore: bool
    ) -> int:
        """Write `routes` (moving no traffic toward a candidate) and confirm them, re-writing
        with a new version after each failed confirmation, until `rollback_timeout_s`.

        `restore`: put the previous routes back when Envoy explicitly refuses the new ones
        (set_routes only; they can never go live, and the previous ones still serve).
        """
        started = time.monotonic()
        deadline = started + self.rollback_timeout_s
        removed = sorted(losses(mark.routes, routes) - {routes.stable})
        fence = mark.fence
        written: list[int] = []
        reason = "no answer yet"
        pause = 0.05
        while True:
            # First attempt: the version just read. Later: read again (a forced writer may
            # have written); never lower than anything this object wrote.
            file_version = mark.version if not written else self._file_version(mark.version)
            version = max(self._version, file_version) + 1
            if removed and (fence is None or not written):
                fence = Fence(version, tuple(removed), f"{kind} by {self._me}")
            offset = self._log_size()
            text = render_route_config(
                routes, version=version, route_timeout_s=self.route_timeout_s, fence=fence
            )
            self._write(text)
            self._version = self._basis = version  # this writer has seen its own retreat
            written.append(version)
            attempt_until = min(deadline, time.monotonic() + self.confirm_timeout_s)
            outcome, reason = self._await_live(written, offset, attempt_until)
            if outcome is _Outcome.LIVE:
                if len(written) > 1:
                    log.warning(
                        "%s: %s confirmed after %d writes, %.1f s",
                        self.service,
                        kind,
                        len(written),
                        time.monotonic() - started,
                    )
                return version
            if outcome is _Outcome.REFUSED and restore:
                self._put_back(mark, version)
                raise StackError(
                    f"Envoy refused routes version {version} (update_rejected): {reason}; "
                    f"the previous routes (version {mark.version}) keep serving"
                )
            if time.monotonic() >= deadline:
                raise self._unconfirmed(kind, mark, routes, version, reason, locked)
            time.sleep(max(0.0, min(pause, deadline - time.monotonic())))
            pause = min(pause * 2, 1.0)

    def _await_live(
        self, written: list[int], log_offset: int, until: float
    ) -> tuple[_Outcome, str]:
        """Poll the admin until one of `written` is live, Envoy logs a refusal, or `until`."""
        ours = {str(v) for v in written}
        reason = "no answer yet"
        while True:
            remaining = until - time.monotonic()
            try:
                stats = self._rds_stats(timeout_s=max(0.05, min(self.admin.timeout_s, remaining)))
            except StackError as exc:
                stats, reason = None, str(exc)
            if stats is not None:
                live = stats.get("version_text")
                if live in ours:
                    return _Outcome.LIVE, ""
                refused = self._refusal(log_offset)
                if refused is not None:
                    return _Outcome.REFUSED, refused
                reason = f"the admin answers, live routes version {live}"
            if time.monotonic() >= until:
                return _Outcome.UNCONFIRMED, reason
            time.sleep(0.002 if stats is not None else 0.02)

    def _unconfirmed(
        self,
        kind: str,
        mark: RouteMark,
        routes: Routes,
        version: int,
        reason: str,
        locked: bool,
    ) -> RollbackUnconfirmed:
        what = (
            f"the stable-only routes (all traffic to version {routes.stable})"
            if set(gains(None, routes)) == {routes.stable}
            else f"the new routes ({routes.model_dump_json(exclude_defaults=True)})"
        )
        unlocked = (
            ""
            if locked
            else f" They were written without the routes lock, held by {self._holder()}."
        )
        message = (
            f"{kind} of {self.service!r} not confirmed by Envoy within "
            f"{self.rollback_timeout_s:g} s, but {what} ARE in the route file {self.route_path} "
            f"(routes version {version}); nothing was put back. Envoy reloads that file by itself, "
            "so traffic follows it as soon as Envoy does, and an Envoy that restarts boots on "
            f"it.{unlocked} Last from the admin at {self.admin.url}: {reason}. Check that Envoy "
            f"is running (log: {self.log_path}), that "
            f"`curl '{self.admin.url}/stats?filter=rds.{ROUTE_CONFIG}.version_text'` shows "
            f"{version} or later, and that cluster.canary.upstream_rq_total stops growing."
        )
        return RollbackUnconfirmed(
            message, change=RouteChange(before=mark.routes, after=routes), version=version
        )

    # ---- the admin and the log ----------------------------------------------------------------

    def _rds_stats(self, timeout_s: float | None = None) -> dict[str, str]:
        stats = self.admin.stats(
            _RDS + r"(version_text|update_rejected|update_failure)$", timeout_s=timeout_s
        )
        return {name.rsplit(".", 1)[1]: value for name, value in stats.items()}

    def _confirm(self, version: int, before: dict[str, str], log_offset: int) -> None:
        deadline = time.monotonic() + self.confirm_timeout_s
        while True:
            remaining = deadline - time.monotonic()
            stats = self._rds_stats(timeout_s=max(0.05, min(self.admin.timeout_s, remaining)))
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
                    f"previous routes are put back; see {self.log_path}"
                )
            time.sleep(0.002)

    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def _refusal(self, log_offset: int) -> str | None:
        """Envoy's reason if it logged a refused route file since `log_offset`, else None."""
        text = self._log_since(log_offset)
        start = text.rfind(_REJECTED)
        if start < 0:
            return None
        lines = text[start:].splitlines()
        detail = next((line[2:] for line in lines if line.startswith(": ")), lines[0])
        return detail if len(detail) <= 400 else "..." + detail[-400:]

    def _reason(self, log_offset: int) -> str:
        """Envoy's own words: the rejection logged after the proto dump of the refused config."""
        for _ in range(10):
            found = self._refusal(log_offset)
            if found is not None:
                return found
            time.sleep(0.02)  # the log line may trail the stat by a moment
        return f"no reason logged; see {self.log_path}"

    def _log_since(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as handle:
                handle.seek(offset)
                return handle.read().decode(errors="replace")
        except FileNotFoundError:
            return ""


def _lenient_version(text: str, default: int = 0) -> int:
    """A route file's version, read even from a file whose mark is damaged."""
    try:
        return parse_route_mark(text).version
    except StackError:
        found = _VERSION_INFO.search(text)
        return int(found.group(1)) if found else default


def _try(fd: int, mode: int) -> bool:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _poll(attempt: Callable[[], bool], deadline: float) -> bool:
    """Call `attempt` until it returns True or `deadline` passes (then one last call)."""
    pause = 0.0005
    while True:
        expired = time.monotonic() >= deadline
        if attempt():
            return True
        if expired:
            return False
        time.sleep(pause)
        pause = min(pause * 2, 0.004)
