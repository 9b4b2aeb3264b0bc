"""The test session is an entry point like the CLI: MLflow's client set as canaryflow runs it."""

from __future__ import annotations

import os

from canaryflow.settings import missing_mlflow_client_env

os.environ.update(missing_mlflow_client_env(os.environ))
