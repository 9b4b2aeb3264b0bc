"""Where canaryflow finds its parts: one settings object, passed in, never read deep inside.

`Settings` says where state lives; `Endpoints` (in contracts) says where the running parts
answer. A stack started by `canaryflow up` writes its endpoints to `<home>/stack.json`;
`load_endpoints` is the one reader of that file, for flows started by a worker or the CLI.

A flow never takes its endpoints (and with them the trust store) as a parameter: anyone who can
reach the Prefect API could then start a release that trusts their own key. Flows ask
`worker_endpoints()`: what the process running them pinned (`pinned_endpoints`: the CLI, the
demo, tests), else the stack under the worker's `CANARYFLOW_HOME`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from canaryflow.contracts import Endpoints, PolicyFloor, ProvidersFile
from canaryflow.errors import StackError

STACK_FILE = "stack.json"

# MLflow's client retries a dead server for ~4 minutes (7 tries, backoff 2) and prints run URLs
# on stdout. Our callers retry on their own (`retries.py`), so every entry point (the CLI, the
# worker through prefect.yaml, the test session) starts with these unless the user chose values.
# The library itself never writes the environment.
MLFLOW_CLIENT_ENV = {
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


def missing_mlflow_client_env(environ: Mapping[str, str]) -> dict[str, str]:
    """What an entry point adds to its environment: the defaults the user did not set."""
    return {key: value for key, value in MLFLOW_CLIENT_ENV.items() if key not in environ}


class Settings(BaseSettings):
    """Environment variables `CANARYFLOW_*` override the defaults (pydantic-settings order)."""

    model_config = SettingsConfigDict(env_prefix="CANARYFLOW_", extra="forbid")

    home: Path = Field(Path(".canaryflow"), description="state of the embedded stack")
    policies_dir: Path = Path("deployments/policies")
    floors_file: Path | None = Field(
        None, description="YAML of policy floors ('default' and per service); None: built-in"
    )
    providers_file: Path | None = Field(
        None,
        description="YAML of providers (credentials by reference); None: the stack's "
        "provider_urls, called without a key",
    )

    def floor_for(self, service: str) -> PolicyFloor:
        """The service's floor: its own entry, else the file's `default`, else the built-in."""
        if self.floors_file is None:
            return PolicyFloor()
        from canaryflow.loading import load_floors

        floors = load_floors(self.floors_file)
        return floors.get(service) or floors.get("default") or PolicyFloor()

    def providers(self, endpoints: Endpoints | None = None) -> ProvidersFile | None:
        """Read on every call, so an edited file counts from the next release on. With a
        stack's `endpoints`, merged with the stack's own entries (the sandbox) as its model
        services see them (`stack_providers`: a clashing name is refused). None: no file; callers
        then use the stack's bare `provider_urls`."""
        if self.providers_file is None:
            return None
        from canaryflow.providers.config import load_providers, stack_providers

        if endpoints is None:
            return load_providers(self.providers_file)
        return stack_providers(self.providers_file, endpoints.provider_urls)

    def endpoints(self) -> Endpoints:
        """The endpoints of the stack under `home`."""
        return load_endpoints(self.home)


_PINNED: ContextVar[Endpoints | None] = ContextVar("canaryflow_pinned_endpoints", default=None)


@contextlib.contextmanager
def pinned_endpoints(endpoints: Endpoints) -> Iterator[Endpoints]:
    """Flows run by this process (in this context) use `endpoints`."""
    token = _PINNED.set(endpoints)
    try:
        yield endpoints
    finally:
        _PINNED.reset(token)


def worker_endpoints() -> Endpoints:
    """The endpoints a flow works with: pinned by its process, else the worker's stack."""
    pinned = _PINNED.get()
    return pinned if pinned is not None else Settings().endpoints()


def load_endpoints(home: Path) -> Endpoints:
    """Endpoints of a stack started by `canaryflow up` in another process."""
    path = home / STACK_FILE
    if not path.exists():
        raise StackError(f"no running stack under {home}: start one with `canaryflow up`")
    return Endpoints.model_validate_json(path.read_text())


def save_endpoints(endpoints: Endpoints, home: Path) -> Path:
    """Owner-only: the file names every part's address, and other users need none of them.

    Written beside and renamed over: a reader (`canaryflow status`, a flow) never sees it half
    written."""
    path = home / STACK_FILE
    partial = path.with_name(f".{STACK_FILE}.{os.getpid()}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(endpoints.model_dump_json(indent=2))
    os.replace(partial, path)
    return path
