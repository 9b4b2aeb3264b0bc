"""The providers file: what it accepts, what it refuses, and that a refusal never quotes a key."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from canaryflow.contracts import AuthStyle, Endpoints, ProviderConfig
from canaryflow.errors import ConfigError
from canaryflow.local.stack import EmbeddedStack
from canaryflow.providers.config import (
    credential_headers,
    from_urls,
    key_variables,
    load_providers,
    resolve_key,
    ssl_context,
    stack_providers,
)
from canaryflow.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-proj-Zq8literalKEYthatMustNeverShow1234"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "providers.yaml"
    path.write_text(text)
    return path


def refusal(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as refused:
        load_providers(path)
    message = str(refused.value)
    assert KEY not in message and KEY not in repr(refused.value)
    assert str(path) in message, "the error names the file"
    return message


def test_a_full_entry_loads_and_a_bare_one_gets_the_defaults(tmp_path: Path) -> None:
    providers = load_providers(
        write(
            tmp_path,
            """
providers:
  azure:
    base_url: https://my-resource.openai.azure.com/openai/v1/
    api_key_env: AZURE_OPENAI_API_KEY
    auth: api-key
    headers: {x-ms-useragent: canaryflow}
    timeout_s: 60
    concurrency: 8
    requests_per_s: 5
    price: {input_per_1k: 0.0025, output_per_1k: 0.01}
    ca_bundle: corp-ca.pem
  local:
    base_url: http://127.0.0.1:11434/v1
    auth: none
""",
        )
    )
    azure, local = providers.providers["azure"], providers.providers["local"]
    assert azure.base_url == "https://my-resource.openai.azure.com/openai/v1"
    assert azure.auth is AuthStyle.API_KEY and azure.requests_per_s == 5
    assert azure.price is not None and azure.price.output_per_1k == 0.01
    assert (local.timeout_s, local.concurrency, local.key_source()) == (30.0, None, None)


@pytest.mark.parametrize("field", ["api_key", "key", "token", "API-Key"])
def test_a_literal_key_field_is_refused_without_quoting_it(tmp_path: Path, field: str) -> None:
    message = refusal(
        tmp_path, f"providers:\n  openai:\n    base_url: https://api.openai.com/v1\n"
        f"    {field}: {KEY}\n",
    )  # fmt: skip
    assert f"provider openai: field '{field}' is not allowed" in message
    assert "api_key_env" in message and "chmod 600" in message


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (f"api_key_env: {KEY}", "api_key_env: must be the NAME of an environment variable"),
        (
            f"api_key_env: OPENAI_API_KEY\n    headers: {{Authorization: Bearer {KEY}}}",
            "headers: header 'Authorization' carries a credential",
        ),
        ("api_key_env: K\n    auth: basic", "auth: Input should be 'bearer', 'api-key' or 'none'"),
        ("api_key_env: K\n    api_key_file: /k", "set api_key_env or api_key_file, not both"),
        ("auth: bearer", "auth 'bearer' needs api_key_env or api_key_file"),
        ("auth: none\n    api_key_env: K", "auth is 'none' but a key is named"),
        ("api_key_env: K\n    timeout_s: 0", "timeout_s: Input should be greater than 0"),
        ("api_key_env: K\n    apikey_env: K", "apikey_env: unknown field"),
    ],
)
def test_bad_entries_name_the_provider_and_the_field(
    tmp_path: Path, entry: str, expected: str
) -> None:
    text = f"providers:\n  p1:\n    base_url: https://api.example.com/v1\n    {entry}\n"
    message = refusal(tmp_path, text)
    assert f"provider p1: {expected}" in message


@pytest.mark.parametrize(
    "url",
    [
        "api.openai.com/v1",
        "ftp://api.openai.com/v1",
        "https:///v1",
        f"https://user:{KEY}@api.example.com/v1",
        f"https://api.example.com/v1?key={KEY}",
    ],
)
def test_a_bad_base_url_is_refused_without_quoting_it(tmp_path: Path, url: str) -> None:
    message = refusal(tmp_path, f"providers:\n  p1:\n    base_url: '{url}'\n    auth: none\n")
    assert "provider p1: base_url: must" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("providers: [1, 2]", "needs a top-level `providers:` mapping"),
        ("openai: {base_url: x}", "needs a top-level `providers:` mapping"),
        ("providers: {a: [unclosed", "is not valid YAML at line 1"),
        ("providers:\n  p1: just-a-string\n", "provider p1: Input should be"),
    ],
)
def test_a_malformed_file_says_what_is_wrong(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in refusal(tmp_path, text)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'nope.yaml'} is unreadable")):
        load_providers(tmp_path / "nope.yaml")


def test_the_key_is_read_at_call_time_and_hidden_in_reprs(tmp_path: Path) -> None:
    config = ProviderConfig(base_url="https://api.openai.com/v1", api_key_env="OPENAI_API_KEY")
    key = resolve_key("openai", config, {"OPENAI_API_KEY": f" {KEY}\n"})
    assert key is not None and key.get_secret_value() == KEY
    assert KEY not in repr(key) and KEY not in str(key) and KEY not in repr(config)
    with pytest.raises(ConfigError, match=r"^provider openai: environment variable \$OPENAI"):
        resolve_key("openai", config, {"OPENAI_API_KEY": "  "})
    headers = credential_headers("openai", config, {"OPENAI_API_KEY": KEY})
    assert headers == {"authorization": f"Bearer {KEY}"}
    azure = config.model_copy(update={"auth": AuthStyle.API_KEY, "headers": {"x-a": "1"}})
    assert credential_headers("azure", azure, {"OPENAI_API_KEY": KEY}) == {
        "x-a": "1",
        "api-key": KEY,
    }


def test_an_empty_key_file_is_refused(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.touch(mode=0o600)
    config = ProviderConfig(base_url="https://x.example/v1", api_key_file=str(key_file))
    with pytest.raises(ConfigError, match=f"key file {key_file} is empty"):
        resolve_key("x", config)


def test_bare_urls_become_keyless_entries_and_tls_follows_the_scheme(tmp_path: Path) -> None:
    providers = from_urls({"sandbox": "http://127.0.0.1:8400/"})
    sandbox = providers.providers["sandbox"]
    assert sandbox.base_url == "http://127.0.0.1:8400/v1" and sandbox.auth is AuthStyle.NONE
    assert credential_headers("sandbox", sandbox) == {}
    assert ssl_context("sandbox", sandbox) is None
    secure = ProviderConfig(base_url="https://x.example/v1", auth=AuthStyle.NONE)
    assert ssl_context("x", secure) is not None  # the system's CAs
    broken = secure.model_copy(update={"ca_bundle": str(tmp_path / "absent.pem")})
    with pytest.raises(ConfigError, match=r"^provider x: ca_bundle .*absent.pem is unusable"):
        ssl_context("x", broken)


def test_the_readme_examples_load(tmp_path: Path) -> None:
    """The providers files the README shows are valid, so a user copying one starts right."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Use your own provider", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```yaml\n(providers:.*?)```", section, flags=re.S)
    assert len(blocks) >= 1
    names = set()
    for block in blocks:
        names |= set(load_providers(write(tmp_path, block)).providers)
    assert {"openai", "gemini", "azure", "vllm", "ollama"} <= names


def test_settings_name_the_providers_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().providers() is None or "CANARYFLOW_PROVIDERS_FILE" in os.environ
    path = write(tmp_path, "providers:\n  local:\n    base_url: http://127.0.0.1:8000/v1\n"
                 "    auth: none\n")  # fmt: skip
    monkeypatch.setenv("CANARYFLOW_PROVIDERS_FILE", str(path))
    providers = Settings().providers()
    assert providers is not None and list(providers.providers) == ["local"]


SECURED = (
    "providers:\n  secured:\n    base_url: https://llm.example/v1\n    api_key_env: SECURED_KEY\n"
)


def test_the_stack_merges_the_users_file_with_its_sandbox(tmp_path: Path) -> None:
    """What the stack writes for its services and what its worker and CLI call: the user's
    entries (keys by reference) and the sandbox, one file."""
    path = write(tmp_path, SECURED)
    merged = stack_providers(path, {"sandbox": "http://127.0.0.1:8400"})
    assert list(merged.providers) == ["secured", "sandbox"]
    assert (
        merged.providers["sandbox"]
        == from_urls({"sandbox": "http://127.0.0.1:8400"}).providers["sandbox"]
    )
    assert key_variables(merged) == {"SECURED_KEY"}
    assert stack_providers(None, {"sandbox": "http://127.0.0.1:8400"}) == from_urls(
        {"sandbox": "http://127.0.0.1:8400"}
    )
    endpoints = Endpoints(
        home=str(tmp_path),
        mlflow_uri="http://mlflow",
        keys_dir="keys",
        provider_urls={"sandbox": "http://127.0.0.1:8400"},
    )
    settings = Settings(providers_file=path)
    assert settings.providers(endpoints) == merged  # the worker sees what the services see
    alone = settings.providers()
    assert alone is not None and list(alone.providers) == ["secured"]
    assert Settings(providers_file=None).providers(endpoints) is None  # bare URLs, as before


def test_a_users_entry_named_like_the_stacks_own_is_refused_unless_identical(
    tmp_path: Path,
) -> None:
    elsewhere = write(
        tmp_path, SECURED + "  sandbox:\n    base_url: http://10.0.0.9:8400/v1\n    auth: none\n"
    )
    with pytest.raises(ConfigError) as clash:
        stack_providers(elsewhere, {"sandbox": "http://127.0.0.1:8400"})
    assert str(clash.value).startswith(
        f"provider 'sandbox' in {elsewhere} clashes with the stack's own 'sandbox' "
        "(http://127.0.0.1:8400/v1, no key)"
    )
    same = write(
        tmp_path,
        SECURED + "  sandbox:\n    base_url: http://127.0.0.1:8400/v1\n    auth: none\n",
    )
    assert list(stack_providers(same, {"sandbox": "http://127.0.0.1:8400"}).providers) == [
        "secured",
        "sandbox",
    ]


def test_the_stack_refuses_a_bad_or_clashing_file_before_starting_anything(
    tmp_path: Path,
) -> None:
    bad = write(tmp_path, "providers:\n  p:\n    base_url: ftp://x\n    auth: none\n")
    with pytest.raises(ConfigError, match="is invalid"):
        EmbeddedStack(tmp_path / "home", providers_file=bad)
    clashing = write(tmp_path, "providers:\n  sandbox:\n    base_url: http://x:1\n    auth: none\n")
    stack = EmbeddedStack(tmp_path / "home", providers_file=clashing, webhook=False)
    with pytest.raises(ConfigError, match="clashes with the stack's own 'sandbox'"):
        stack.start()
    assert stack.processes == [] and stack.endpoints is None


def test_up_takes_the_providers_file_from_its_option_the_global_one_or_the_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from canaryflow.app.cli import _providers_file, build_parser

    parser = build_parser()
    monkeypatch.delenv("CANARYFLOW_PROVIDERS_FILE", raising=False)
    assert _providers_file(parser.parse_args(["up"])) is None
    assert _providers_file(parser.parse_args(["up", "--providers", "a.yaml"])) == Path("a.yaml")
    assert _providers_file(parser.parse_args(["--providers", "b.yaml", "up"])) == Path("b.yaml")
    monkeypatch.setenv("CANARYFLOW_PROVIDERS_FILE", str(tmp_path / "c.yaml"))
    assert _providers_file(parser.parse_args(["up"])) == tmp_path / "c.yaml"
