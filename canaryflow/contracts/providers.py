"""Providers as configuration: where each model provider answers and how to prove who we are.

A providers file names credentials, it never holds them: a key written into a file that is
copied into specs, artifacts, tickets and backups is a key leaked. So a provider says where its
key lives (`api_key_env`, `api_key_file`) and the key is read at call time
(`canaryflow.providers.config.resolve_key`). Any field that could carry the key itself (`api_key`,
an `Authorization` header, a URL with a password or a query string) is refused, and the refusal
never quotes the value.
"""

from __future__ import annotations

import re
from enum import StrEnum
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from canaryflow.contracts.base import Strict
from canaryflow.contracts.manifests import Price

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Headers that carry a credential: they come from the key reference, never from `headers`.
CREDENTIAL_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "api-key", "x-api-key", "x-goog-api-key", "cookie"}
)
# Field names a user might reach for to paste the key: refused with the way to do it instead.
LITERAL_KEY_FIELDS = frozenset(
    {"api_key", "apikey", "key", "token", "secret", "password", "bearer", "authorization"}
)
LITERAL_KEY_ADVICE = (
    "a providers file never holds a key: put it in an environment variable named by "
    "api_key_env, or in a file readable only by you (chmod 600) named by api_key_file"
)


class AuthStyle(StrEnum):
    BEARER = "bearer"  # Authorization: Bearer <key> (OpenAI, Gemini, Together, Groq, vLLM)
    API_KEY = "api-key"  # api-key: <key> (Azure OpenAI)
    NONE = "none"  # no credential (the sandbox, a local vLLM or Ollama)


class ProviderConfig(Strict):
    """One provider; its name is its key in the providers file and `Origin.provider`."""

    base_url: str = Field(
        description="the API root, as an OpenAI SDK's base_url: https://api.openai.com/v1"
    )
    api_key_env: str | None = Field(None, description="environment variable holding the key")
    api_key_file: str | None = Field(None, description="file holding the key, mode 0600")
    auth: AuthStyle = AuthStyle.BEARER
    headers: dict[str, str] = Field(
        default_factory=dict, description="extra headers, e.g. OpenAI-Organization; no credential"
    )
    timeout_s: float = Field(30.0, gt=0.0, le=600.0)
    concurrency: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="requests in flight at most, per caller process (each model service, an "
        "evaluation); None: no cap on live traffic, 32 at a time for an evaluation",
    )
    requests_per_s: float | None = Field(
        None, gt=0.0, description="rate limit per caller process; None: none"
    )
    price: Price | None = Field(None, description="price default for manifests of this provider")
    ca_bundle: str | None = Field(None, description="PEM CA bundle; None: the system's CAs")
    stream_usage: bool = Field(
        True,
        description="ask streams for usage (stream_options.include_usage); false for a provider "
        "that refuses it: tokens are then estimated from the streamed text",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_literal_key(cls, data: object) -> object:
        if isinstance(data, dict):
            for name in data:
                if str(name).lower().replace("-", "_") in LITERAL_KEY_FIELDS:
                    raise ValueError(f"field {name!r} is not allowed: {LITERAL_KEY_ADVICE}")
        return data

    @field_validator("base_url")
    @classmethod
    def _origin(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if parts.username or parts.password or parts.query or parts.fragment:
            raise ValueError(
                "must not carry credentials, a query or a fragment (user:password@, ?key=): "
                + LITERAL_KEY_ADVICE
            )
        return url.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, name: str | None) -> str | None:
        if name is not None and not ENV_NAME.match(name):
            raise ValueError(
                "must be the NAME of an environment variable (letters, digits, _), "
                "not the key itself"
            )
        return name

    @field_validator("headers")
    @classmethod
    def _no_credential_header(cls, headers: dict[str, str]) -> dict[str, str]:
        for name in headers:
            if name.lower() in CREDENTIAL_HEADERS:
                raise ValueError(
                    f"header {name!r} carries a credential; set `auth` and {LITERAL_KEY_ADVICE}"
                )
        return headers

    @model_validator(mode="after")
    def _one_key_source(self) -> ProviderConfig:
        sources = [s for s in (self.api_key_env, self.api_key_file) if s is not None]
        if len(sources) > 1:
            raise ValueError("set api_key_env or api_key_file, not both")
        if self.auth is AuthStyle.NONE and sources:
            raise ValueError("auth is 'none' but a key is named: set auth to bearer or api-key")
        if self.auth is not AuthStyle.NONE and not sources:
            raise ValueError(
                f"auth {self.auth.value!r} needs api_key_env or api_key_file "
                "(or auth: none for a provider without keys)"
            )
        return self

    def key_source(self) -> str | None:
        """Where the key comes from, for messages: never the key. None: no key."""
        if self.api_key_env is not None:
            return f"${self.api_key_env}"
        if self.api_key_file is not None:
            return f"key file {self.api_key_file}"
        return None


class ProvidersFile(Strict):
    """`providers: {name: ProviderConfig}`, the YAML a worker, the CLI and the stack share."""

    providers: dict[str, ProviderConfig] = Field(default_factory=dict)
