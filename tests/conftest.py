"""The test session is an entry point like the CLI: MLflow's client set as canaryflow runs it.

One real MLflow and one real Prefect server serve every integration and fault test needing one.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

from canaryflow.local.processes import ManagedProcess, free_port, http_ok
from canaryflow.local.stack import prefect_server, url_of
from canaryflow.settings import missing_mlflow_client_env

os.environ.update(missing_mlflow_client_env(os.environ))


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` (SQLite + local artifacts) over HTTP; yields its tracking URI."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    home = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    options = {
        "--host": "127.0.0.1",
        "--port": str(port),
        "--backend-store-uri": f"sqlite:///{home}/mlflow.db",
        "--artifacts-destination": str(home / "artifacts"),
        "--workers": "1",
    }
    command = [sys.executable, "-m", "mlflow", "server", "--serve-artifacts"]
    server = ManagedProcess(
        "mlflow",
        command + [part for pair in options.items() for part in pair],
        home / "mlflow.log",
        http_ok(f"http://127.0.0.1:{port}/health"),
        env={"MLFLOW_DISABLE_TELEMETRY": "true"},
        cwd=home,
    )
    server.start(timeout_s=120)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `prefect server` (SQLite, no UI); yields its API URL."""
    server = prefect_server(tmp_path_factory.mktemp("prefect"), ui=False)
    server.start(timeout_s=120)
    try:
        yield f"{url_of(server)}/api"
    finally:
        server.stop()
