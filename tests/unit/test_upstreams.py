"""The model service's view of the providers file: one `Upstream` per provider, the credential
read when a plan is built, never in a repr or an answer; the stack's file is owner-only."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from canaryflow.contracts import Endpoints, ProviderConfig
from canaryflow.dataplane.forwarder import ServiceError, Upstreams, provider_error
from canaryflow.local.stack import PROVIDERS_FILE, model_service
from canaryflow.providers.config import from_urls, load_providers, write_providers

VAR = "CANARYFLOW_UNIT_UPSTREAM_KEY"
KEY = "sk-unit-Zq8literalKEYthatMustNeverShow"


def secured(**fields: object) -> ProviderConfig:
    return ProviderConfig.model_validate(
        {"base_url": "https://llm.example/v1", "api_key_env": VAR, **fields}
    )


def test_an_upstream_carries_the_key_to_the_forwarder_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(VAR, KEY)
    upstreams = Upstreams(
        {"p": secured(), **from_urls({"sandbox": "http://127.0.0.1:1"}).providers}
    )
    upstream = upstreams.get("p")
    assert upstream.url == "https://llm.example/v1/chat/completions"
    assert upstream.headers == {"authorization": f"Bearer {KEY}"}
    assert upstream.tls is not None and KEY not in repr(upstream)
    assert upstreams.get("p") is upstream  # same key: same upstream (its pooled head kept)
    monkeypatch.setenv(VAR, KEY + "-rotated")
    assert upstreams.get("p") is not upstream  # a rotated key counts from the next plan
    bare = upstreams.get("sandbox")
    assert bare.url == "http://127.0.0.1:1/v1/chat/completions" and bare.headers == {}


def test_refusals_name_the_variable_and_never_quote_the_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    upstreams = Upstreams({"p": secured(auth="api-key")})
    with pytest.raises(ServiceError) as missing:
        upstreams.get("p")
    assert missing.value.message == f"provider p: environment variable ${VAR} is not set"
    with pytest.raises(ServiceError, match=r"provider 'q' is not configured \(configured: p\)"):
        upstreams.get("q")
    monkeypatch.setenv(VAR, KEY)
    upstream = upstreams.get("p")
    echoed = json.dumps({"error": {"message": f"Incorrect API key provided: {KEY}"}}).encode()
    rejected = provider_error(401, echoed, None, upstream)
    assert rejected.message == f"provider p rejected the key from ${VAR} (HTTP 401)"
    other = provider_error(500, echoed, None, upstream)
    assert KEY not in other.message and KEY not in other.body({}).decode()
    assert "[redacted]" in other.message


def test_written_providers_files_are_owner_only_and_load_back(tmp_path: Path) -> None:
    bare = from_urls({"sandbox": "http://127.0.0.1:8400", "vllm": "http://127.0.0.1:9/v1/"})
    path = write_providers(tmp_path / "providers.yaml", bare)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = load_providers(path)
    assert loaded == bare
    assert loaded.providers["vllm"].base_url == "http://127.0.0.1:9/v1"


def test_the_stack_starts_its_services_with_its_providers_file(tmp_path: Path) -> None:
    endpoints = Endpoints(
        home=str(tmp_path),
        mlflow_uri="http://mlflow",
        keys_dir="keys",
        provider_urls={"sandbox": "http://127.0.0.1:2"},
    )
    path = tmp_path / PROVIDERS_FILE
    command = list(model_service(tmp_path, "primary", "svc", endpoints, providers=path).command)
    assert command[command.index("--providers") + 1] == str(path)
    assert not [arg for arg in command if arg.startswith("--provider-url")]
    bare = list(model_service(tmp_path, "primary", "svc", endpoints).command)
    assert "--provider-url=sandbox=http://127.0.0.1:2" in bare  # without a file, as before
