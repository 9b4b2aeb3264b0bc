"""Servers shared by the integration tests: each starts once per session and is always stopped."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer

import pytest

from canaryflow.local.processes import ManagedProcess, free_port, http_ok
from tests.integration.busy_prefect import BusyPrefect


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


@pytest.fixture
def busy_prefect() -> Iterator[str]:
    """A fresh `BusyPrefect`; yields its API URL. Tests set `busy` and `ok` before calling."""
    BusyPrefect.busy, BusyPrefect.ok, BusyPrefect.posts = 0, (200, {}), []
    server = ThreadingHTTPServer(("127.0.0.1", 0), BusyPrefect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/api"
    server.shutdown()
    server.server_close()
