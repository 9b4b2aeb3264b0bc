"""The embedded local stack: Prefect server, MLflow, the sandbox provider, the CI webhook
receiver, and the data plane.

Everything listens on 127.0.0.1 on ports the OS chose, keeps its state under one home folder
(`.canaryflow/` by default), and is stopped by `EmbeddedStack.stop()`: every process group at
once, SIGTERM then SIGKILL. The control plane starts first (parallel, since Prefect and MLflow
each take seconds); the data plane starts once a service has a champion to route to.

Servers are started from worker threads, never from the caller's thread: a signal handler that
raises in the main thread (`canaryflow up` on SIGTERM) can interrupt only a wait, never a fork
half done. Once the caller's `cancelled()` is true (or a part failed, or `stop()` began), parts
still starting give up within 0.1 s and stop what they started. `local/processes.py` describes
what happens to the children when this process is killed outright.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Protocol, TypeVar

from canaryflow.contracts import Endpoints
from canaryflow.deliveries import WEBHOOK_SECRET_ENV, WEBHOOK_SECRET_FILE
from canaryflow.errors import ConfigError, StackError
from canaryflow.local.processes import (
    ManagedProcess,
    cancelled_when,
    free_port,
    http_ok,
    withhold,
)
from canaryflow.providers.config import (
    key_variables,
    load_providers,
    stack_providers,
    write_providers,
)
from canaryflow.settings import STACK_FILE, save_endpoints

PYTHON = sys.executable
# `canaryflow up --max-body-bytes N` sets it: request bodies above N bytes are refused 413.
PROJECT = Path(__file__).resolve().parents[2]
PROVIDERS_FILE = "providers.yaml"  # the user's providers (keys by reference) + the sandbox
Progress = Callable[[str], None]


class Stoppable(Protocol):
    def stop(self) -> None: ...


class Startable(Stoppable, Protocol):
    def start(self, timeout_s: float) -> object: ...


Part = TypeVar("Part", bound=Startable)


def _quiet(_: str) -> None:
    pass


def _never() -> bool:
    return False


def prefect_server(home: Path, ui: bool = True) -> ManagedProcess:
    port = free_port()
    prefect_home = home / "prefect"
    env = {
        "PREFECT_HOME": str(prefect_home),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{prefect_home / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_UI_ENABLED": "true" if ui else "false",
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "PREFECT_SERVER_EVENTS_PROACTIVE_GRANULARITY": "PT1S",  # silence checks: 1 s, not 5 s
    }
    command = [PYTHON, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
    return ManagedProcess(
        name="prefect",
        command=[*command, "--port", str(port), "--analytics-off"],
        log_path=home / "logs" / "prefect.log",
        ready=http_ok(f"http://127.0.0.1:{port}/api/health"),
        env=env,
    )


def mlflow_server(home: Path) -> ManagedProcess:
    port = free_port()
    store = home / "mlflow"
    store.mkdir(parents=True, exist_ok=True)
    command = [
        PYTHON, "-m", "mlflow", "server",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
        "--artifacts-destination", (store / "artifacts").resolve().as_uri(),
        "--serve-artifacts",
        "--workers", "1",
    ]  # fmt: skip
    return ManagedProcess(
        name="mlflow",
        command=command,
        log_path=home / "logs" / "mlflow.log",
        ready=http_ok(f"http://127.0.0.1:{port}/health"),
        env={"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"},
    )


def sandbox_server(home: Path) -> ManagedProcess:
    port = free_port()
    return ManagedProcess(
        name="sandbox",
        command=[PYTHON, "-m", "canaryflow.sandbox", "--host", "127.0.0.1", "--port", str(port)],
        log_path=home / "logs" / "sandbox.log",
        ready=http_ok(f"http://127.0.0.1:{port}/health"),
    )


def model_service(
    home: Path,
    name: str,
    service: str,
    endpoints: Endpoints,
    tool_urls: Mapping[str, str] | None = None,
    max_body_bytes: int | None = None,
    timeout_s: float | None = None,
    providers: Path | None = None,
    needs: Collection[str] = (),
    uds: Path | None = None,
    policy: Path | None = None,
) -> ManagedProcess:
    """One `canaryflow serve` process; the embedded stack runs a primary and a shadow one,
    with its providers file (`providers`; None: `--provider-url` from the endpoints), Envoy
    reaching each over its Unix socket `uds` (owner-only; the TCP port stays for health checks
    and direct callers).

    `tool_urls` (tool name -> URL) is where the service POSTs a tool call's arguments; a shadow
    is told them too but never calls them (a dry run only counts the calls it skipped). Its
    admin port (warm-up, metrics) is on loopback, apart from the public one Envoy sends to.
    `needs`: the variables its providers take their keys from, which other servers never get."""
    port, admin_port = free_port(), free_port()
    limit = [] if max_body_bytes is None else ["--max-body-bytes", str(max_body_bytes)]
    limit += [] if timeout_s is None else ["--timeout", f"{timeout_s:g}"]
    limit += [] if uds is None else ["--uds", str(uds)]
    limit += [] if policy is None else ["--policy", str(policy)]  # its checkers
    bare = [f"--provider-url={key}={url}" for key, url in endpoints.provider_urls.items()]
    tools = [f"--tool-url={tool}={url}" for tool, url in (tool_urls or {}).items()]
    command = [
        PYTHON, "-m", "canaryflow.dataplane.serve",
        "--service", service,
        "--port", str(port),
        "--admin-port", str(admin_port),
        "--registry-uri", endpoints.mlflow_uri,
        "--keys-dir", endpoints.keys_dir,  # registry manifests are verified before serving
        "--store", str(endpoints.store_url),
        *limit,
        *(bare if providers is None else ["--providers", str(providers)]),
        *tools,
    ]  # fmt: skip
    return ManagedProcess(
        name=f"model-service-{name}",
        command=command,
        log_path=home / "logs" / f"service-{name}.log",
        ready=http_ok(f"http://127.0.0.1:{port}/health"),
        needs=needs,
    )


def socket_folder(home: Path) -> Path:
    """Where the model services' Unix sockets go: `<home>/sockets` (0700), or a private
    temporary folder when that path would be too long for a socket address (~100 bytes)."""
    folder = home / "sockets"
    if len(os.fsencode(folder / "service-primary.sock")) > 100:
        return Path(tempfile.mkdtemp(prefix="canaryflow-sockets-"))  # made 0700
    folder.mkdir(mode=0o700, exist_ok=True)
    folder.chmod(0o700)
    return folder


class _RemoveFolder:
    """Stopped with the stack: removes a temporary folder (the services' sockets)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def stop(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def admin_url_of(process: ManagedProcess) -> str:
    """A model service's admin URL (its `--admin-port` argument)."""
    command = list(process.command)
    return f"http://127.0.0.1:{command[command.index('--admin-port') + 1]}"


def webhook_secret(home: Path) -> Path | None:
    """None when CANARYFLOW_WEBHOOK_SECRET is set; else a secret made once under `home`,
    readable by its owner only, that CI must sign with."""
    if os.environ.get(WEBHOOK_SECRET_ENV, "").strip():
        return None
    path = home / WEBHOOK_SECRET_FILE
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(secrets.token_urlsafe(32))
    path.chmod(0o600)
    return path


def webhook_receiver(home: Path, prefect_api_url: str) -> ManagedProcess | None:
    """`deployments/webhook.py` as a managed process; None outside a source checkout, where
    `deployments/` is not installed."""
    if not (PROJECT / "deployments" / "webhook.py").is_file():
        return None
    port = free_port()
    secret_file = webhook_secret(home)
    command = [
        PYTHON, "-m", "deployments.webhook",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--prefect-api", prefect_api_url,
        "--state-dir", str(home / "webhook"),  # replay memory: survives a restart of the receiver
    ]  # fmt: skip
    if secret_file is not None:
        command += ["--secret-file", str(secret_file)]
    return ManagedProcess(
        name="webhook",
        command=command,
        log_path=home / "logs" / "webhook.log",
        ready=http_ok(f"http://127.0.0.1:{port}/health"),
        cwd=PROJECT,
        needs=(WEBHOOK_SECRET_ENV,),
    )


def url_of(process: ManagedProcess) -> str:
    """The http URL a server was told to listen on (its `--port` argument)."""
    command = list(process.command)
    return f"http://127.0.0.1:{command[command.index('--port') + 1]}"


class EmbeddedStack:
    """Start what a release needs on this machine; stop all of it, whatever happened."""

    def __init__(
        self,
        home: Path,
        *,
        ui: bool = True,
        webhook: bool = True,
        progress: Progress = _quiet,
        cancelled: Callable[[], bool] = _never,
        max_request_bytes: int | None = None,
        request_timeout_s: float = 30.0,
        providers_file: Path | None = None,
        checkers_policy: Path | None = None,
    ) -> None:
        """`cancelled` is polled while parts start (from worker threads, so it must only read
        a flag): once true, the start gives up and stops what it started.
        `max_request_bytes`: the body cap of Envoy and the model services (None: 1 MiB).
        `request_timeout_s`: the model services' provider timeout, which is also how long a
        release waits for the last window's late finishers.
        `providers_file`: the user's providers, merged with the sandbox into
        `<home>/providers.yaml` (read here first: a bad file is refused before anything starts).
        `checkers_policy`: a policy whose `checkers:` the model services run (None: the
        built-in ones); read here first too."""
        self.home = home.resolve()
        self.ui = ui
        self.webhook = webhook
        self.progress = progress
        self.cancelled = cancelled
        self.processes: list[ManagedProcess | Stoppable] = []
        self.endpoints: Endpoints | None = None
        self._stopping = False
        if max_request_bytes is not None and max_request_bytes < 1:
            raise ConfigError(f"the body limit must be at least 1 byte, got {max_request_bytes}")
        self.max_request_bytes = max_request_bytes
        self.request_timeout_s = request_timeout_s
        if providers_file is not None:
            load_providers(providers_file)
        self.providers_file = providers_file
        if checkers_policy is not None:
            from canaryflow.loading import load_policy

            load_policy(checkers_policy)
        self.checkers_policy = checkers_policy
        self.provider_keys: frozenset[str] = frozenset()

    def _start_together(self, parts: Sequence[Part], timeout_s: float) -> list[Part]:
        """Start `parts` in worker threads (each registered for `stop()` first), wait for all.
        On any failure or exception in this thread (a signal), the others give up at once."""
        self.processes.extend(parts)
        failed: list[BaseException] = []

        def giving_up() -> bool:
            return bool(failed) or self._stopping or self.cancelled()

        def start(part: Part) -> Part:
            with cancelled_when(giving_up):
                try:
                    part.start(timeout_s)
                except BaseException as exc:
                    failed.append(exc)
                    raise
            return part

        pool = ThreadPoolExecutor(len(parts))
        try:
            futures = [pool.submit(start, part) for part in parts]
            return [future.result() for future in futures]
        except BaseException as exc:
            failed.append(exc)
            raise
        finally:
            pool.shutdown(wait=True)

    def start(self, timeout_s: float = 120.0) -> Endpoints:
        self._stopping = False
        self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        prefect = prefect_server(self.home, ui=self.ui)
        parts = [prefect, mlflow_server(self.home), sandbox_server(self.home)]
        # The user's entries and the sandbox; a clash is refused before anything starts. Their
        # keys' variables go to the model services only.
        providers = stack_providers(self.providers_file, {"sandbox": url_of(parts[2])})
        self.provider_keys = key_variables(providers)
        withhold({*self.provider_keys, WEBHOOK_SECRET_ENV})
        # The receiver only needs Prefect's URL, known before Prefect answers: start together.
        receiver = webhook_receiver(self.home, f"{url_of(prefect)}/api") if self.webhook else None
        if receiver is not None:
            parts.append(receiver)
        try:
            for started in self._start_together(parts, timeout_s):
                self.progress(f"{started.name} ready at {url_of(started)}")
        except BaseException:
            self.stop()
            raise
        _, mlflow, sandbox = parts[:3]
        keys_dir = self.home / "keys"
        keys_dir.mkdir(exist_ok=True)
        self.endpoints = Endpoints(
            home=str(self.home),
            mlflow_uri=url_of(mlflow),
            prefect_api_url=f"{url_of(prefect)}/api",
            provider_urls={"sandbox": url_of(sandbox)},
            keys_dir=str(keys_dir),
            store_url=f"sqlite:///{self.home / 'store.db'}",
            webhook_url=url_of(receiver) if receiver is not None else None,
        )
        # What the services are started with: keys by reference only, owner-only.
        write_providers(self.home / PROVIDERS_FILE, providers)
        self.save()
        return self.endpoints

    def start_dataplane(
        self,
        service: str,
        stable_version: str,
        timeout_s: float = 60.0,
        tool_urls: Mapping[str, str] | None = None,
    ) -> Endpoints:
        """Model services, Envoy in front of them, Prometheus scraping both: live traffic.
        `tool_urls` (tool name -> URL) go to both model services (`--tool-url`)."""
        from canaryflow.dataplane.envoy_config import DEFAULT_MAX_REQUEST_BYTES
        from canaryflow.local.envoy import EnvoyProxy
        from canaryflow.local.prometheus import PrometheusServer

        if self.endpoints is None:
            raise StackError("start the control plane first (EmbeddedStack.start)")
        limit = self.max_request_bytes
        sockets = socket_folder(self.home)
        if not sockets.is_relative_to(self.home):  # a temporary folder: gone with the stack
            self.processes.append(_RemoveFolder(sockets))
        services = [
            model_service(
                self.home,
                name,
                service,
                self.endpoints,
                tool_urls,
                limit,
                self.request_timeout_s,
                providers=self.home / PROVIDERS_FILE,
                needs=self.provider_keys,
                uds=sockets / f"service-{name}.sock",
                policy=self.checkers_policy,
            )
            for name in ("primary", "shadow")
        ]
        self._start_together(services, timeout_s)
        # Envoy reaches the services over their Unix sockets: less CPU per request than TCP.
        primary, shadow = (sockets / f"service-{name}.sock" for name in ("primary", "shadow"))
        envoy = EnvoyProxy(
            self.home / "envoy",
            service=service,
            listen_port=free_port(),
            admin_port=free_port(),
            upstreams={"stable": primary, "canary": primary, "shadow": shadow},
            initial_stable=stable_version,
            synthetic_port=free_port(),
            max_request_bytes=DEFAULT_MAX_REQUEST_BYTES if limit is None else limit,
        )
        self._start_together([envoy], timeout_s)
        self.progress(f"envoy ready at {envoy.url} (admin {envoy.admin_url})")
        prometheus = PrometheusServer(
            self.home / "prometheus",
            # Metrics are on the services' admin ports; the public ones answer 404 for them.
            targets={"model-service": [admin_url_of(p).split("//", 1)[1] for p in services]},
        )
        self._start_together([prometheus], timeout_s)
        self.progress(f"prometheus ready at {prometheus.url}")
        self.endpoints = self.endpoints.model_copy(
            update={
                "envoy_url": envoy.url,
                "envoy_synthetic_url": envoy.synthetic_url,
                "envoy_admin_url": envoy.admin_url,
                "envoy_home": str(envoy.home),
                "prometheus_url": prometheus.url,
                "model_service_urls": [url_of(p) for p in services],
                "model_service_admin_urls": [admin_url_of(p) for p in services],
                "request_timeout_s": self.request_timeout_s,
            }
        )
        self.save()
        return self.endpoints

    def save(self) -> None:
        if self.endpoints is not None:
            save_endpoints(self.endpoints, self.home)

    def stop(self) -> None:
        """Stop every part at once (each: its group SIGTERM, SIGKILL after its grace period)."""
        self._stopping = True

        def stop(process: ManagedProcess | Stoppable) -> Exception | None:
            try:
                process.stop()
            except Exception as exc:  # the others are stopped all the same; raised below
                return exc
            return None

        errors: list[Exception | None] = []
        if self.processes:
            with ThreadPoolExecutor(len(self.processes)) as pool:
                errors = list(pool.map(stop, reversed(self.processes)))
        self.processes.clear()
        (self.home / STACK_FILE).unlink(missing_ok=True)
        for error in errors:
            if error is not None:
                raise error

    def __enter__(self) -> EmbeddedStack:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
