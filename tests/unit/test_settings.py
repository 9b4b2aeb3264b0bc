"""Where canaryflow finds its parts: the stack file, and the environment entry points set."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import yaml

from canaryflow.contracts import Endpoints
from canaryflow.errors import StackError
from canaryflow.settings import (
    MLFLOW_CLIENT_ENV,
    Settings,
    load_endpoints,
    missing_mlflow_client_env,
    save_endpoints,
)

ROOT = Path(__file__).resolve().parents[2]


def test_endpoints_round_trip_through_an_owner_only_file(tmp_path: Path) -> None:
    endpoints = Endpoints(home=str(tmp_path), mlflow_uri="http://127.0.0.1:1", keys_dir="k")
    path = save_endpoints(endpoints, tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_endpoints(tmp_path) == endpoints
    assert Settings(home=tmp_path).endpoints() == endpoints


def test_no_stack_says_how_to_start_one(tmp_path: Path) -> None:
    with pytest.raises(StackError, match="canaryflow up"):
        load_endpoints(tmp_path)


def test_settings_refuse_unknown_fields() -> None:
    with pytest.raises(ValueError, match="extra"):
        Settings(homes="typo")  # type: ignore[call-arg]


def test_an_entry_point_keeps_what_the_user_chose() -> None:
    chosen = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "120"}
    added = missing_mlflow_client_env(chosen)
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in added
    assert (
        added["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
        == MLFLOW_CLIENT_ENV["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
    )


def test_every_deployment_runs_with_the_mlflow_client_settings() -> None:
    """The worker is an entry point too: prefect.yaml gives each flow the same environment."""
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    for deployment in config["deployments"]:
        env = deployment["work_pool"]["job_variables"]["env"]
        assert {k: env.get(k) for k in MLFLOW_CLIENT_ENV} == MLFLOW_CLIENT_ENV, deployment["name"]
