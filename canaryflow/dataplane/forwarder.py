"""The hot-path call to the provider: build it from a release, send it, map its failures.

`Plan` is a version's provider call precomputed once per manifest; `provider_payload` wraps the
user's last message in the version's template and applies its decoding parameters;
`ServiceError` is an answer the service gives instead of the provider's (OpenAI error shape).

The lean `Http1Client` (`http1.py`) is the default: per call it costs about a third of the CPU of
aiohttp's ClientSession, and httpx's AsyncClient collapsed above ~250 req/s on this machine
(FACTS.md). aiohttp and httpx stay selectable (`--forwarder aiohttp|httpx`) so the benchmark keeps
measuring all three on the same path.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import aiohttp
import httpx

from canaryflow.contracts import ModelManifest
from canaryflow.dataplane.http1 import Http1Client, Reply
from canaryflow.errors import CanaryflowError, TransientProviderError
from canaryflow.providers.client import request_parameters

ForwarderKind = Literal["http1", "aiohttp", "httpx"]
_JSON = {"content-type": "application/json"}


class Forwarder(Protocol):
    """POST a JSON body and return the raw answer. An HTTP error status is a `Reply`; a provider
    that is unreachable or slower than `timeout_s` raises `TransientProviderError`."""

    async def start(self) -> None: ...

    async def post(self, url: str, body: bytes, timeout_s: float) -> Reply: ...

    async def aclose(self) -> None: ...


class AiohttpForwarder:
    def __init__(self, max_connections: int = 512) -> None:
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self._max_connections, keepalive_timeout=30)
        self._session = aiohttp.ClientSession(
            connector=connector, skip_auto_headers=("User-Agent",)
        )

    async def post(self, url: str, body: bytes, timeout_s: float) -> Reply:
        if self._session is None:
            raise RuntimeError("AiohttpForwarder.post() before start()")
        try:
            async with self._session.post(
                url, data=body, headers=_JSON, timeout=aiohttp.ClientTimeout(total=timeout_s)
            ) as response:
                body = await response.read()
                return Reply(response.status, body, response.headers.get("retry-after"))
        except TimeoutError as exc:
            raise TransientProviderError(f"provider {url} did not answer in {timeout_s} s") from exc
        except aiohttp.ClientError as exc:
            raise TransientProviderError(f"provider {url} unreachable: {exc}") from exc

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class HttpxForwarder:
    def __init__(self, max_connections: int = 512) -> None:
        self._max_connections = max_connections
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        limits = httpx.Limits(
            max_connections=self._max_connections,
            max_keepalive_connections=self._max_connections,
        )
        self._client = httpx.AsyncClient(limits=limits, headers=_JSON)

    async def post(self, url: str, body: bytes, timeout_s: float) -> Reply:
        if self._client is None:
            raise RuntimeError("HttpxForwarder.post() before start()")
        try:
            response = await self._client.post(url, content=body, timeout=timeout_s)
        except httpx.TimeoutException as exc:
            raise TransientProviderError(f"provider {url} did not answer in {timeout_s} s") from exc
        except httpx.HTTPError as exc:
            raise TransientProviderError(f"provider {url} unreachable: {exc}") from exc
        return Reply(response.status_code, response.content, response.headers.get("retry-after"))

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def make_forwarder(kind: ForwarderKind = "http1") -> Forwarder:
    if kind == "http1":
        return Http1Client()
    if kind == "aiohttp":
        return AiohttpForwarder()
    if kind == "httpx":
        return HttpxForwarder()
    raise ValueError(f"unknown forwarder {kind!r}: use 'http1', 'aiohttp' or 'httpx'")


# --------------------------------------------------------------------------- the call


class ServiceError(CanaryflowError):
    """An answer the service gives instead of the provider's: HTTP status + OpenAI error body."""

    def __init__(self, status: int, message: str, kind: str, retry_after: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.retry_after = status, message, kind, retry_after

    def body(self, headers: dict[str, str]) -> bytes:
        """The OpenAI-shaped error body; adds `retry-after` to `headers` when there is one."""
        if self.retry_after:
            headers["retry-after"] = self.retry_after
        error = {"error": {"message": self.message, "type": self.kind, "code": self.status}}
        return json.dumps(error).encode()


@dataclass(frozen=True, slots=True)
class Plan:
    """A version's provider call, precomputed once per manifest."""

    manifest: ModelManifest
    url: str
    fixed: dict[str, Any]


def plan_for(manifest: ModelManifest, provider_urls: Mapping[str, str]) -> Plan:
    base = provider_urls.get(manifest.origin.provider)
    if base is None:
        raise ServiceError(
            502,
            f"no provider URL for {manifest.origin.provider!r} (model {manifest.model_id}): "
            f"start the service with --provider-url {manifest.origin.provider}=http://...",
            "provider_not_configured",
        )
    base = base.rstrip("/")
    url = f"{base}/chat/completions" if base.endswith("/v1") else f"{base}/v1/chat/completions"
    fixed: dict[str, Any] = {"model": manifest.origin.model, **request_parameters(manifest)}
    return Plan(manifest, url, fixed)


def parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise ServiceError(400, f"request body is not JSON: {exc}", "invalid_request") from exc
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        raise ServiceError(
            400, "body must be a JSON object with a 'messages' list", "invalid_request"
        )
    if body.get("stream"):
        raise ServiceError(400, "streaming is not supported: send stream=false", "invalid_request")
    return body


def provider_payload(plan: Plan, body: dict[str, Any]) -> tuple[bytes, str]:
    """The user's messages with the last user message wrapped in the version's template."""
    messages: list[Any] = list(body["messages"])
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str):
            user_input = m["content"]
            messages[i] = {**m, "content": plan.manifest.render(user_input)}
            break
    else:
        raise ServiceError(
            400, "messages hold no user message with text content", "invalid_request"
        )
    payload = {**plan.fixed, "messages": messages}
    for key in ("tools", "tool_choice", "response_format", "user"):
        if key in body:
            payload[key] = body[key]
    return json.dumps(payload).encode(), user_input


def provider_error(status: int, body: bytes, retry_after: str | None) -> ServiceError:
    try:
        detail = json.loads(body)["error"]["message"]
    except (ValueError, LookupError, TypeError):
        detail = body[:200].decode(errors="replace")
    if status == 429:
        return ServiceError(429, f"provider rate limit: {detail}", "rate_limited", retry_after)
    return ServiceError(502, f"provider answered {status}: {detail}", "provider_error")
