"""The embedded local stack: Prefect server, MLflow, the sandbox provider, the CI webhook
receiver, and the data plane.

Everything listens on 127.0.0.1 on ports the OS chose, keeps its state under one home folder
(`.canaryflow/` by default), and is stopped by `EmbeddedStack.stop()` in reverse start order.
The control plane starts first (parallel, since Prefect and MLflow each take seconds); the data
plane starts once a service has a champion to route to.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Protocol

from canaryflow.contracts import Endpoints
from canaryflow.deliveries import WEBHOOK_SECRET_ENV, WEBHOOK_SECRET_FILE
from canaryflow.errors import StackError
from canaryflow.local.processes import ManagedProcess, free_port, http_ok
from canaryflow.settings import STACK_FILE, save_endpoints

PYTHON = sys.executable
PROJECT = Path(__file__).resolve().parents[2]
Progress = Callable[[str], None]


class Stoppable(Protocol):
    def stop(self) -> None: ...


def _quiet(_: str) -> None:
    pass


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


def model_service(home: Path, name: str, service: str, endpoints: Endpoints) -> ManagedProcess:
    """One `canaryflow serve` process; the embedded stack runs a primary and a shadow one."""
    port = free_port()
    providers = [f"--provider-url={key}={url}" for key, url in endpoints.provider_urls.items()]
    command = [
        PYTHON, "-m", "canaryflow.dataplane.serve",
        "--service", service,
        "--port", str(port),
        "--registry-uri", endpoints.mlflow_uri,
        "--store", str(endpoints.store_url),
        "--check-sample", "1.0",
        *providers,
    ]  # fmt: skip
    return ManagedProcess(
        name=f"model-service-{name}",
        command=command,
        log_path=home / "logs" / f"service-{name}.log",
        ready=http_ok(f"http://127.0.0.1:{port}/health"),
    )


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
    )


def url_of(process: ManagedProcess) -> str:
    """The http URL a server was told to listen on (its `--port` argument)."""
    command = list(process.command)
    return f"http://127.0.0.1:{command[command.index('--port') + 1]}"


class EmbeddedStack:
    """Start what a release needs on this machine; stop all of it, whatever happened."""

    def __init__(
        self, home: Path, *, ui: bool = True, webhook: bool = True, progress: Progress = _quiet
    ) -> None:
        self.home = home.resolve()
        self.ui = ui
        self.webhook = webhook
        self.progress = progress
        self.processes: list[ManagedProcess | Stoppable] = []
        self.endpoints: Endpoints | None = None

    def start(self, timeout_s: float = 120.0) -> Endpoints:
        self.home.mkdir(parents=True, exist_ok=True)
        prefect = prefect_server(self.home, ui=self.ui)
        parts = [prefect, mlflow_server(self.home), sandbox_server(self.home)]
        # The receiver only needs Prefect's URL, known before Prefect answers: start together.
        receiver = webhook_receiver(self.home, f"{url_of(prefect)}/api") if self.webhook else None
        if receiver is not None:
            parts.append(receiver)
        self.processes.extend(parts)
        try:
            with ThreadPoolExecutor(len(parts)) as pool:
                for started in pool.map(lambda p: p.start(timeout_s), parts):
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
        self.save()
        return self.endpoints

    def start_dataplane(
        self, service: str, stable_version: str, timeout_s: float = 60.0
    ) -> Endpoints:
        """Model services, Envoy in front of them, Prometheus scraping both: live traffic."""
        from canaryflow.local.envoy import EnvoyProxy
        from canaryflow.local.prometheus import PrometheusServer

        if self.endpoints is None:
            raise StackError("start the control plane first (EmbeddedStack.start)")
        services = [
            model_service(self.home, "primary", service, self.endpoints),
            model_service(self.home, "shadow", service, self.endpoints),
        ]
        self.processes.extend(services)
        with ThreadPoolExecutor(len(services)) as pool:
            list(pool.map(lambda p: p.start(timeout_s), services))
        primary, shadow = (("127.0.0.1", int(url_of(p).rsplit(":", 1)[1])) for p in services)
        envoy = EnvoyProxy(
            self.home / "envoy",
            service=service,
            listen_port=free_port(),
            admin_port=free_port(),
            upstreams={"stable": primary, "canary": primary, "shadow": shadow},
            initial_stable=stable_version,
        )
        self.processes.append(envoy)
        envoy.start(timeout_s)
        self.progress(f"envoy ready at {envoy.url} (admin {envoy.admin_url})")
        prometheus = PrometheusServer(
            self.home / "prometheus",
            targets={"model-service": [f"{h}:{p}" for h, p in (primary, shadow)]},
        )
        self.processes.append(prometheus)
        prometheus.start(timeout_s)
        self.progress(f"prometheus ready at {prometheus.url}")
        self.endpoints = self.endpoints.model_copy(
            update={
                "envoy_url": envoy.url,
                "envoy_admin_url": envoy.admin_url,
                "envoy_home": str(envoy.home),
                "prometheus_url": prometheus.url,
                "model_service_urls": [url_of(p) for p in services],
            }
        )
        self.save()
        return self.endpoints

    def save(self) -> None:
        if self.endpoints is not None:
            save_endpoints(self.endpoints, self.home)

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()
        (self.home / STACK_FILE).unlink(missing_ok=True)

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
