"""Where canaryflow finds its parts: one settings object, passed in, never read deep inside."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Environment variables `CANARYFLOW_*` override the defaults (pydantic-settings order)."""

    model_config = SettingsConfigDict(env_prefix="CANARYFLOW_", extra="forbid")

    home: Path = Field(Path(".canaryflow"), description="state of the embedded stack")
    mlflow_tracking_uri: str | None = None
    prefect_api_url: str | None = None
    provider_urls: dict[str, str] = Field(
        default_factory=dict, description="provider key -> OpenAI-compatible base URL"
    )
    trusted_keys_dir: Path | None = None
    signing_key: Path | None = None
    policies_dir: Path = Path("deployments/policies")

    @property
    def keys_dir(self) -> Path:
        return self.trusted_keys_dir or self.home / "keys"
