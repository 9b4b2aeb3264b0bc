"""The hot-path call to the provider: build it from a release, send it, map its failures.

`Upstream` is a provider as the hot path calls it (chat URL, credential headers, TLS context),
built from its providers-file entry when a version's plan is built; `Plan` is a version's
provider call precomputed once per manifest; `provider_payload` wraps the user's last message in
the version's template and applies its decoding parameters; `ServiceError` is an answer the
service gives instead of the provider's (OpenAI error shape). The credential lives only in
`Upstream.headers` and the bytes sent: never in a log line, a repr or an answer's body.

The lean `Http1Client` (`http1.py`) is the default: per call it costs about a third of the CPU of
aiohttp's ClientSession, and httpx's AsyncClient collapsed above ~250 req/s on this machine
(FACTS.md). aiohttp and httpx stay selectable (`--forwarder aiohttp|httpx`) so the benchmark keeps
measuring all three on the same path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import aiohttp
import httpx

from canaryflow.contracts import ModelManifest, ProviderConfig
from canaryflow.dataplane.http1 import BodyStream, Http1Client, Reply
from canaryflow.errors import CanaryflowError, ConfigError, TransientProviderError
from canaryflow.providers.client import request_parameters
from canaryflow.providers.config import credential_headers, ssl_context

ForwarderKind = Literal["http1", "aiohttp", "httpx"]
_JSON = {"content-type": "application/json"}


class StreamedAnswer(Protocol):
    """A streamed answer: status at once, body chunk by chunk (`BodyStream` is one)."""

    status: int
    retry_after: str | None
    complete: bool

    async def next(self, timeout_s: float) -> bytes | None: ...

    async def read(self, timeout_s: float) -> bytes: ...


class Forwarder(Protocol):
    """POST a JSON body and return the raw answer. An HTTP error status is a `Reply`; a provider
    that is unreachable or slower than `timeout_s` raises `TransientProviderError`. `headers`
    (a provider's credential and extra headers) and `tls` (its CA bundle) come from an
    `Upstream`; pass the same objects every call, they are cached by identity. `stream` yields
    at the answer's headers; `timeout_s` then bounds each gap between chunks, and leaving the
    block early drops the provider's call."""

    async def start(self) -> None: ...

    async def post(
        self,
        url: str,
        body: bytes,
        timeout_s: float,
        headers: Mapping[str, str] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> Reply: ...

    def stream(
        self,
        url: str,
        body: bytes,
        timeout_s: float,
        headers: Mapping[str, str] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> contextlib.AbstractAsyncContextManager[StreamedAnswer]: ...

    async def preconnect(
        self,
        url: str,
        count: int,
        headers: Mapping[str, str] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> int: ...

    async def aclose(self) -> None: ...


class _ChunkReader:
    """`StreamedAnswer` over any async iterator of body chunks (aiohttp's, httpx's)."""

    def __init__(self, status: int, retry_after: str | None, chunks: AsyncIterator[bytes]):
        self.status, self.retry_after, self.complete = status, retry_after, False
        self._chunks = chunks

    async def next(self, timeout_s: float) -> bytes | None:
        try:
            async with asyncio.timeout(timeout_s):
                return await anext(self._chunks)
        except StopAsyncIteration:
            self.complete = True
            return None
        except TimeoutError:
            raise TransientProviderError(f"provider sent nothing for {timeout_s} s") from None
        except (aiohttp.ClientError, httpx.HTTPError) as exc:
            raise TransientProviderError(f"provider stream broke: {exc}") from exc

    read = BodyStream.read


class _OpensOnDemand:
    """aiohttp and httpx open connections on demand only: `preconnect` opens none (the
    default forwarder, `http1`, does)."""

    async def preconnect(
        self,
        url: str,
        count: int,
        headers: Mapping[str, str] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> int:
        return 0


class AiohttpForwarder(_OpensOnDemand):
    def __init__(self, max_connections: int = 512) -> None:
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self._max_connections, keepalive_timeout=30)
        self._session = aiohttp.ClientSession(
            connector=connector, skip_auto_headers=("User-Agent",)
        )

    async def post(
        self,
        url: str,
        body: bytes,
        timeout_s: float,
        headers: Mapping[str, str] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> Reply:
        if self._session is None:
            raise RuntimeError("AiohttpForwarder.post() before start()")
        try:
            async with self._session.post(
                url,
                data=body,
                headers=_JSON if headers is None else {**_JSON, **headers},
                timeout=aiohttp.ClientTimeout(total=timeout_s),
                ssl=tls if tls is not None else True,
            ) as response:
                body = await response.read()
                return Reply(response.status, body, response.headers.get("retry-after"))
        except TimeoutError as exc:
            raise TransientProviderError(f"provider {url} did not answer in {timeout_s} s") from exc
        except aiohttp.ClientError as exc:
            raise TransientProviderError(f"provider {url} unreachable: {exc}") from exc

    @contextlib.asynccontextmanager
    async def stream(
        self,
        url: str,
        body: bytes,
        timeout_s: float,
        headers: Mapping[str, str] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> AsyncIterator[StreamedAnswer]:
        if self._session is None:
            raise RuntimeError("AiohttpForwarder.stream() before start()")
        try:
            response = await self._session.post(
                url,
                data=body,
                headers=_JSON if headers is None else {**_JSON, **headers},
                timeout=aiohttp.ClientTimeout(sock_connect=timeout_s, sock_read=timeout_s),
                ssl=tls if tls is not None else True,
            )
        except TimeoutError as exc:
            raise TransientProviderError(f"provider {url} did not answer in {timeout_s} s") from exc
        except aiohttp.ClientError as exc:
            raise TransientProviderError(f"provider {url} unreachable: {exc}") from exc
        try:
            retry_after = response.headers.get("retry-after")
            yield _ChunkReader(response.status, retry_after, response.content.iter_any())
        finally:
            response.close()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class HttpxForwarder(_OpensOnDemand):
    def __init__(self, max_connections: int = 512) -> None:
        self._max_connections = max_connections
        self._clients: dict[int, httpx.AsyncClient] | None = None  # by id() of the TLS context
        self._contexts: list[ssl.SSLContext] = []  # kept alive, so their ids stay theirs

    async def start(self) -> None:
        self._clients = {}

    def _client(self, tls: ssl.SSLContext | None) -> httpx.AsyncClient:
        if self._clients is None:
            raise RuntimeError("HttpxForwarder.post() before start()")
        client = self._clients.get(id(tls))
        if client is None:
            limits = httpx.Limits(
                max_connections=self._max_connections,
                max_keepalive_connections=self._max_connections,
            )
            verify: ssl.SSLContext | bool = tls if tls is not None else True
            client = httpx.AsyncClient(limits=limits, headers=_JSON, verify=verify)
            self._clients[id(tls)] = client
            self._contexts += [tls] if tls is not None else []
        return client

    async def post(
        self,
        url: str,
        body: bytes,
        timeout_s: float,
        headers: Mapping[str, str] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> Reply:
        client = self._client(tls)
        try:
            response = await client.post(url, content=body, headers=headers, timeout=timeout_s)
        except httpx.TimeoutException as exc:
            raise TransientProviderError(f"provider {url} did not answer in {timeout_s} s") from exc
        except httpx.HTTPError as exc:
            raise TransientProviderError(f"provider {url} unreachable: {exc}") from exc
        return Reply(response.status_code, response.content, response.headers.get("retry-after"))

    @contextlib.asynccontextmanager
    async def stream(
        self,
        url: str,
        body: bytes,
        timeout_s: float,
        headers: Mapping[str, str] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> AsyncIterator[StreamedAnswer]:
        client = self._client(tls)
        request = client.build_request(
            "POST", url, content=body, headers=headers, timeout=timeout_s
        )
        try:
            response = await client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            raise TransientProviderError(f"provider {url} did not answer in {timeout_s} s") from exc
        except httpx.HTTPError as exc:
            raise TransientProviderError(f"provider {url} unreachable: {exc}") from exc
        try:
            retry_after = response.headers.get("retry-after")
            yield _ChunkReader(response.status_code, retry_after, response.aiter_raw())
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        for client in (self._clients or {}).values():
            await client.aclose()
        self._clients = None


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


@dataclass(frozen=True, slots=True, eq=False)
class Upstream:
    """One provider as the hot path calls it. `headers` hold the credential in clear: they go
    to the forwarder and nowhere else (left out of the repr)."""

    name: str
    url: str  # the chat completions URL
    headers: Mapping[str, str] = field(repr=False)
    tls: ssl.SSLContext | None = field(default=None, repr=False)
    key_source: str | None = None  # "$VAR" or "key file PATH", for messages; None: no key
    stream_usage: bool = True  # ask for usage in streams (`stream_options.include_usage`)
    timeout_s: float | None = None  # the entry's; the service's own timeout still caps it
    limits: Limits | None = None

    def timeout(self, service_timeout_s: float) -> float:
        """The entry's timeout may shorten the service's, never lengthen it: the release's
        late-record look waits for the service's timeout, so nothing may outlive it."""
        return (
            service_timeout_s if self.timeout_s is None else min(self.timeout_s, service_timeout_s)
        )

    def admission(self) -> contextlib.AbstractContextManager[None]:
        """Hold while a call is in flight; raises `ServiceError` over the entry's limits."""
        return self.limits.admit() if self.limits is not None else contextlib.nullcontext()

    def rejected(self, status: int) -> ServiceError:
        """401/403: one sentence naming where the key came from; the provider's body is not
        quoted (some providers echo part of the key they refused)."""
        if self.key_source is None:
            message = f"provider {self.name} refused a request without a key (HTTP {status})"
        else:
            message = (
                f"provider {self.name} rejected the key from {self.key_source} (HTTP {status})"
            )
        return ServiceError(502, message, "provider_auth_error")

    def redact(self, text: str) -> str:
        """`text` without any header value sent (nor a bearer token alone)."""
        for value in self.headers.values():
            for secret in {value, value.removeprefix("Bearer ")}:
                if len(secret) >= 4 and secret in text:
                    text = text.replace(secret, "[redacted]")
        return text


class Limits:
    """A providers-file entry's `concurrency` and `requests_per_s`, kept by this process.

    Over a limit a request is refused at once, as Envoy's circuit breakers do, instead of
    queueing: a queue in front of a rate-limited provider only grows, and every user in it
    waits. The refusal is what the provider would answer (503 / 429 with Retry-After) and is
    recorded and counted like one."""

    def __init__(self, name: str, concurrency: int | None, per_s: float | None) -> None:
        self.name, self.concurrency, self.per_s = name, concurrency, per_s
        self.in_flight = 0
        self._tokens = per_s or 0.0  # a token bucket holding one second's worth
        self._filled = time.monotonic()

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        if self.concurrency is not None and self.in_flight >= self.concurrency:
            raise ServiceError(
                503,
                f"provider {self.name}: {self.in_flight} requests in flight, the providers "
                f"file's concurrency limit; raise it or add capacity",
                "provider_concurrency_limit",
            )
        if self.per_s is not None:
            now = time.monotonic()
            self._tokens = min(self.per_s, self._tokens + (now - self._filled) * self.per_s)
            self._filled = now
            if self._tokens < 1.0:
                wait = (1.0 - self._tokens) / self.per_s
                raise ServiceError(
                    429,
                    f"provider {self.name}: over the providers file's requests_per_s "
                    f"({self.per_s:g}/s)",
                    "rate_limited",
                    retry_after=f"{max(wait, 0.001):.3f}",
                )
            self._tokens -= 1.0
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1


class Upstreams:
    """The providers one service may call, by name (`Origin.provider`). An entry's credential
    is read when a plan needs it (at start-up for the champion, then per new version's plan);
    while it reads the same, the same `Upstream` is handed out, so its pooled connections and
    prepared request heads are kept."""

    def __init__(self, providers: Mapping[str, ProviderConfig]) -> None:
        self._configs = dict(providers)
        self._built: dict[str, Upstream] = {}

    def get(self, name: str) -> Upstream:
        config = self._configs.get(name)
        if config is None:
            known = ", ".join(sorted(self._configs)) or "none"
            raise ServiceError(
                502,
                f"provider {name!r} is not configured (configured: {known}): add it to the "
                "service's providers file (serve --providers FILE)",
                "provider_not_configured",
            )
        try:
            headers = credential_headers(name, config)
        except ConfigError as exc:  # its text names the variable or file, never the key
            raise ServiceError(502, str(exc), "provider_not_configured") from None
        known_upstream = self._built.get(name)
        if known_upstream is not None and known_upstream.headers == headers:
            return known_upstream
        try:
            tls = ssl_context(name, config)
        except ConfigError as exc:
            raise ServiceError(502, str(exc), "provider_not_configured") from None
        url = f"{config.base_url}/chat/completions"
        limits = None
        if config.concurrency is not None or config.requests_per_s is not None:
            # A rotated key keeps the count of calls in flight.
            limits = known_upstream.limits if known_upstream is not None else None
            limits = limits or Limits(name, config.concurrency, config.requests_per_s)
        upstream = self._built[name] = Upstream(
            name,
            url,
            headers,
            tls,
            config.key_source(),
            config.stream_usage,
            config.timeout_s,
            limits,
        )
        return upstream


@dataclass(frozen=True, slots=True)
class Plan:
    """A version's provider call, precomputed once per manifest."""

    manifest: ModelManifest
    upstream: Upstream
    fixed: dict[str, Any]


def plan_for(manifest: ModelManifest, upstream: Upstream) -> Plan:
    fixed: dict[str, Any] = {"model": manifest.origin.model, **request_parameters(manifest)}
    return Plan(manifest, upstream, fixed)


def parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise ServiceError(400, f"request body is not JSON: {exc}", "invalid_request") from exc
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        raise ServiceError(
            400, "body must be a JSON object with a 'messages' list", "invalid_request"
        )
    if not isinstance(body.get("stream", False), bool):
        raise ServiceError(400, "'stream' must be true or false", "invalid_request")
    if not isinstance(body.get("stream_options") or {}, dict):
        raise ServiceError(400, "'stream_options' must be an object", "invalid_request")
    return body


def wants_usage(body: dict[str, Any]) -> bool:
    """The client asked for the usage chunk itself (else the one the service asks for is
    read and not passed on)."""
    return bool((body.get("stream_options") or {}).get("include_usage"))


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
    if body.get("stream") is True:
        payload["stream"] = True
        if plan.upstream.stream_usage or wants_usage(body):
            payload["stream_options"] = {"include_usage": True}
    return json.dumps(payload).encode(), user_input


def provider_error(
    status: int, body: bytes, retry_after: str | None, upstream: Upstream
) -> ServiceError:
    if status in (401, 403):
        return upstream.rejected(status)
    try:
        detail = str(json.loads(body)["error"]["message"])
    except (ValueError, LookupError, TypeError):
        detail = body[:200].decode(errors="replace")
    detail = upstream.redact(detail)
    if status == 429:
        return ServiceError(429, f"provider rate limit: {detail}", "rate_limited", retry_after)
    return ServiceError(502, f"provider answered {status}: {detail}", "provider_error")
