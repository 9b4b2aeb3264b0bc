"""Servers shared by the integration tests: each starts once per session and is always stopped."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from canaryflow.local.processes import free_port
from tests.integration.busy_prefect import BusyPrefect


@pytest.fixture
def busy_prefect(prefect_api: str) -> Iterator[BusyPrefect]:
    """A fresh proxy in front of the real Prefect server, forwarding everything until a test
    calls `fail(prefix, times)`; clients go to its `api_url`."""
    proxy = BusyPrefect(prefect_api.removesuffix("/api"))
    yield proxy
    proxy.close()


def _pg_binary(name: str) -> str | None:
    """On PATH, or where Debian's postgresql packages put it."""
    found = shutil.which(name)
    if found is None:
        candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
        found = str(candidates[-1]) if candidates else None
    return found


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A throwaway cluster (initdb as the postgres user, fsync off) for the session, removed
    at the end; modules share it, each test keeps to a service of its own."""
    pg_ctl, initdb, runuser = (_pg_binary("pg_ctl"), _pg_binary("initdb"), shutil.which("runuser"))
    # .ci/run installs Debian's postgresql when it is missing: a missing server fails, never skips.
    assert pg_ctl and initdb and runuser, (
        "PostgreSQL server binaries missing: apt-get install postgresql"
    )
    assert os.geteuid() == 0, "the throwaway cluster is made with runuser -u postgres: run as root"
    data = Path(tempfile.mkdtemp(prefix="canaryflow-pg-"))
    shutil.chown(data, "postgres", "postgres")
    port = free_port()
    as_postgres = [runuser, "-u", "postgres", "--"]
    subprocess.run(
        [*as_postgres, initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"],
        check=True,
        capture_output=True,
    )
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {data} -c fsync=off"
    log = data / "server.log"
    subprocess.run(
        [*as_postgres, pg_ctl, "-D", str(data), "-o", options, "-l", str(log), "-w", "start"],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*as_postgres, pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"],
            check=False,
            capture_output=True,
        )
        shutil.rmtree(data, ignore_errors=True)
