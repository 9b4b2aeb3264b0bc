"""Talking to MLflow, whatever the purpose: the registry and the release ledger both need it.

One lazily created client per connection, and MLflow's exceptions translated into the error tree
(transient vs refused). How long MLflow's own client retries is set by the entry point
(`settings.MLFLOW_CLIENT_ENV`), so our callers' retries decide.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import cached_property
from typing import TYPE_CHECKING, Any

from canaryflow.errors import CanaryflowError, RegistryError, TransientRegistryError

if TYPE_CHECKING:
    from mlflow import MlflowClient

NOT_FOUND = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}


def error_code(exc: BaseException) -> str:
    return str(getattr(exc, "error_code", ""))


@contextlib.contextmanager
def mlflow_errors(action: str) -> Iterator[None]:
    """MLflow down or 5xx -> TransientRegistryError; any other MLflow refusal -> RegistryError."""
    import requests
    from mlflow.exceptions import MlflowException

    try:
        yield
    except CanaryflowError:
        raise
    except MlflowException as exc:
        status = int(exc.get_http_status_code())  # type: ignore[no-untyped-call]
        if status >= 500 or status == 429:
            raise TransientRegistryError(
                f"{action}: MLflow did not answer ({exc.message}); retry once it is back"
            ) from exc
        raise RegistryError(f"{action}: {exc.message}") from exc
    except (requests.RequestException, ConnectionError) as exc:
        raise TransientRegistryError(f"{action}: MLflow unreachable ({exc}); retry") from exc


class MlflowConnection:
    """One MlflowClient per object, created on first use (importing mlflow costs ~2 s)."""

    def __init__(self, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri
        self._experiments: dict[str, str] = {}

    @cached_property
    def client(self) -> MlflowClient:
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    @cached_property
    def writer(self) -> Any:
        """MlflowClient's alias and tag writes first GET the model to refuse prompts (one more
        round trip each); its registry client writes directly, halving a promote's latency.
        Same method names, so a future MLflow without the private accessor falls back."""
        direct = getattr(self.client, "_get_registry_client", None)
        return direct() if direct is not None else self.client

    def experiment_id(self, name: str, create: bool = True) -> str | None:
        if name in self._experiments:
            return self._experiments[name]
        with mlflow_errors(f"looking up experiment {name!r}"):
            experiment = self.client.get_experiment_by_name(name)
            if experiment is not None:
                found = str(experiment.experiment_id)
            elif not create:
                return None
            else:
                found = self._create_experiment(name)
        self._experiments[name] = found
        return found

    def _create_experiment(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        try:
            return str(self.client.create_experiment(name))
        except MlflowException as exc:  # another process created it first
            if error_code(exc) != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return str(experiment.experiment_id)
