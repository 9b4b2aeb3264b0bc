"""The providers file, and the credential each provider names, read only when a call needs it.

Reading the key at call time (not at load) means a rotated key is picked up without a restart,
and the key never sits in a long-lived object that someone may log or pickle. Every error here
names the file, the provider and the field, and never the key or any value the file holds.
"""

from __future__ import annotations

import os
import ssl
import stat
import threading
from collections.abc import Mapping
from pathlib import Path

import yaml
from pydantic import SecretStr, ValidationError

from canaryflow.contracts import AuthStyle, ProviderConfig, ProvidersFile
from canaryflow.errors import ConfigError


def load_providers(path: Path) -> ProvidersFile:
    """The providers file at `path`; every problem in one error, one line each."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"providers file {path} is unreadable ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"providers file {path} is not valid YAML{at}") from None
    if not isinstance(data, dict) or not isinstance(data.get("providers"), dict):
        raise ConfigError(f"providers file {path} needs a top-level `providers:` mapping")
    try:
        return ProvidersFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"providers file {path} is invalid:\n{_describe(exc)}") from None


def _describe(error: ValidationError) -> str:
    """`provider X: field: reason`, without the submitted value: it may be a pasted key."""
    lines = []
    for problem in error.errors():
        loc = [str(part) for part in problem["loc"]]
        if loc[:1] == ["providers"] and len(loc) > 1:
            who, field = f"provider {loc[1]}", ".".join(loc[2:])
        else:
            who, field = "file", ".".join(loc)
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = "unknown field"
        lines.append(f"  - {who}: {field}: {message}" if field else f"  - {who}: {message}")
    return "\n".join(lines)


def from_urls(provider_urls: Mapping[str, str]) -> ProvidersFile:
    """Bare URLs (`Endpoints.provider_urls`, `serve --provider-url`): origins (`/v1` added) or
    API roots ending in `/v1`, called without a credential and without limits."""
    return ProvidersFile(
        providers={
            name: ProviderConfig(
                base_url=_api_root(url),
                auth=AuthStyle.NONE,
            )
            for name, url in provider_urls.items()
        }
    )


def write_providers(path: Path, providers: ProvidersFile) -> Path:
    """`providers` as a providers file at `path`, owner-only (it names where keys live), written
    whole or not at all."""
    data = {"providers": providers.model_dump(mode="json", exclude_defaults=True)["providers"]}
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        yaml.safe_dump(data, file, sort_keys=False)
    os.replace(temporary, path)
    return path


def merge_providers(user: ProvidersFile, own: ProvidersFile, source: str) -> ProvidersFile:
    """The user's entries (from `source`) and the stack's own (the sandbox), as one file: what
    the stack's model services are started with and what its worker and CLI call. A name in
    both must be the same entry: a `sandbox` of yours pointing elsewhere would silently change
    what every sandbox manifest calls, so it is refused, naming the entry."""
    for name, config in own.providers.items():
        theirs = user.providers.get(name)
        if theirs is not None and theirs != config:
            raise ConfigError(
                f"provider {name!r} in {source} clashes with the stack's own {name!r} "
                f"({config.base_url}, no key): rename yours (and the origin.provider of its "
                "manifests), or remove it: the stack adds its own"
            )
    return ProvidersFile(providers={**user.providers, **own.providers})


def stack_providers(path: Path | None, provider_urls: Mapping[str, str]) -> ProvidersFile:
    """The providers file at `path` (None: none) merged with a stack's own bare URLs."""
    own = from_urls(provider_urls)
    return own if path is None else merge_providers(load_providers(path), own, str(path))


def key_variables(providers: ProvidersFile) -> frozenset[str]:
    """The environment variables the entries take their keys from (names, never values)."""
    return frozenset(c.api_key_env for c in providers.providers.values() if c.api_key_env)


def _api_root(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/v1") else f"{url}/v1"


def provider_config(
    providers: ProvidersFile, name: str, source: str = "providers"
) -> ProviderConfig:
    try:
        return providers.providers[name]
    except KeyError:
        known = ", ".join(sorted(providers.providers)) or "none"
        raise ConfigError(
            f"provider {name!r} is not configured in {source} (configured: {known}); "
            "add it to the providers file"
        ) from None


def resolve_key(
    name: str, config: ProviderConfig, environ: Mapping[str, str] | None = None
) -> SecretStr | None:
    """The provider's key, now; None when its auth style needs none."""
    if config.api_key_env is not None:
        value = (os.environ if environ is None else environ).get(config.api_key_env, "")
        if not value.strip():
            raise ConfigError(
                f"provider {name}: environment variable ${config.api_key_env} is not set"
            )
        return SecretStr(value.strip())
    if config.api_key_file is not None:
        return SecretStr(_read_key_file(name, Path(config.api_key_file).expanduser()))
    return None


def _read_key_file(name: str, path: Path) -> str:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise ConfigError(
            f"provider {name}: key file {path} is unreadable ({exc.strerror})"
        ) from None
    with os.fdopen(fd) as file:
        mode = os.fstat(file.fileno()).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"provider {name}: key file {path} is readable by others "
                f"(mode {stat.S_IMODE(mode):o}): chmod 600 {path}"
            )
        try:
            value = file.read().strip()
        except (OSError, UnicodeDecodeError):
            raise ConfigError(f"provider {name}: key file {path} is unreadable") from None
    if not value:
        raise ConfigError(f"provider {name}: key file {path} is empty")
    return value


def credential_headers(
    name: str, config: ProviderConfig, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Extra headers plus the credential in the provider's auth style. Hand the result to the
    HTTP client and drop it: it holds the key in clear."""
    headers = dict(config.headers)
    key = resolve_key(name, config, environ)
    if key is not None:
        if config.auth is AuthStyle.API_KEY:
            headers["api-key"] = key.get_secret_value()
        else:
            headers["authorization"] = f"Bearer {key.get_secret_value()}"
    return headers


def ssl_context(name: str, config: ProviderConfig) -> ssl.SSLContext | None:
    """The configured CA bundle, else the system's CAs; None for plain http."""
    if not config.base_url.startswith("https://"):
        return None
    try:
        return ssl.create_default_context(cafile=config.ca_bundle)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"provider {name}: ca_bundle {config.ca_bundle} is unusable ({exc})"
        ) from None
