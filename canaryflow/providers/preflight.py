"""Before a release publishes anything: can the candidate's provider be called at all?

A missing key, a rejected key, a wrong URL or an unknown model otherwise surfaces as an
offline-evaluation failure minutes later, after `challenger` has moved; asked here, the release
is refused with one sentence and nothing moves. One GET of the model list, never a chat call:
preflight spends no tokens.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote

import aiohttp
import httpx

from canaryflow.contracts import ModelManifest, ProvidersFile
from canaryflow.errors import ConfigError, ProviderResponseError, TransientProviderError
from canaryflow.providers.client import ProviderClient
from canaryflow.providers.config import provider_config

PREFLIGHT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class ProviderCheck:
    provider: str
    base_url: str
    evidence: tuple[str, ...]


def check_provider(
    manifest: ModelManifest,
    providers: ProvidersFile,
    *,
    source: str = "the providers file",
    environ: Mapping[str, str] | None = None,
) -> ProviderCheck:
    """Configured, key present, reachable, key accepted, model listed (where a list is offered).
    Raises a `ConfigError` or `ProviderError` whose message is one sentence."""
    name, model = manifest.origin.provider, manifest.origin.model
    config = provider_config(providers, name, source)
    client = ProviderClient.for_provider(
        name, config, environ, timeout_s=min(config.timeout_s, PREFLIGHT_TIMEOUT_S), max_retries=0
    )
    key = config.key_source() or "no key"
    evidence = [f"provider {name} is configured at {config.base_url} ({key})"]
    evidence += asyncio.run(_ask(client, model))
    return ProviderCheck(provider=name, base_url=config.base_url, evidence=tuple(evidence))


async def _ask(client: ProviderClient, model: str) -> list[str]:
    name = client.name
    answered = "accepted the key" if client.key_source is not None else "answered (no key)"
    async with client:  # reads the key: a missing one fails here, before any request
        try:
            status, body = await client.get("/models")
            if status == 200 and model not in _listed(name, body):
                retrieved, _ = await client.get(f"/models/{quote(model, safe='')}")
                if retrieved != 200:
                    raise ProviderResponseError(
                        f"provider {name} does not offer model {model!r} "
                        f"(its /models lists: {_some(_listed(name, body))})"
                    )
                return [f"provider {name} {answered} and serves {model!r} (retrieved)"]
        except httpx.TransportError as exc:
            raise _unreachable(client, exc) from None
    if status in (401, 403):
        raise client.rejected_key(status)
    if status == 404:
        return [
            f"provider {name} offers no model list (/models: HTTP 404): not a failure; the "
            "key and the model name are first checked by the offline evaluation"
        ]
    if status != 200:
        raise ProviderResponseError(
            f"provider {name} answered GET {client.base_url}/models with HTTP {status}"
        )
    return [f"provider {name} {answered} and lists {model!r}"]


def _listed(name: str, body: bytes) -> list[str]:
    try:
        data = json.loads(body)["data"]
        return [str(item["id"]) for item in data]
    except (ValueError, KeyError, TypeError):
        raise ProviderResponseError(
            f"provider {name} answered /models with something other than an OpenAI model list "
            "(is base_url the API root, e.g. https://api.openai.com/v1?)"
        ) from None


def _some(names: list[str]) -> str:
    shown = ", ".join(names[:10]) or "nothing"
    return shown + (f" and {len(names) - 10} more" if len(names) > 10 else "")


def _unreachable(client: ProviderClient, exc: httpx.TransportError) -> Exception:
    if isinstance(exc.__cause__, aiohttp.ClientSSLError):
        return ConfigError(
            f"provider {client.name} at {client.base_url} failed TLS verification "
            f"({type(exc.__cause__).__name__}): set ca_bundle to the CA that signed its "
            "certificate, or fix the certificate"
        )
    return TransientProviderError(
        f"provider {client.name} at {client.base_url} is unreachable ({type(exc).__name__}: {exc})"
    )
