"""Where canaryflow finds its parts: one settings object, passed in, never read deep inside."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Environment variables `CANARYFLOW_*` override the defaults (pydantic-settings order)."""

    model_config = SettingsConfigDict(env_prefix="CANARYFLOW_", extra="forbid")

    home: Path = Field(Path(".canaryflow"), description="state of the embedded stack")
    policies_dir: Path = Path("deployments/policies")
