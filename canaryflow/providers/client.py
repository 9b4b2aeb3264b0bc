"""Async client for OpenAI-compatible chat providers: bounded concurrency, retries, budget, cache.

Control-plane traffic only (offline evaluation, judges): httpx is fine here, not on the model
service's hot path (see FACTS.md).
"""

from __future__ import annotations

import asyncio
import json
import math
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

import httpx

from canaryflow import retries
from canaryflow.contracts import ModelManifest, ProviderConfig
from canaryflow.errors import (
    BudgetExceeded,
    ConfigError,
    ProviderResponseError,
    TransientProviderError,
)
from canaryflow.providers.config import credential_headers, ssl_context
from canaryflow.providers.transports import AiohttpTransport

if TYPE_CHECKING:
    from canaryflow.providers.cache import ResponseCache

SNIPPET_CHARS = 200


@dataclass(frozen=True, slots=True)
class Completion:
    """One answer. `latency_ms` is the round trip of the attempt that succeeded (retries and
    queueing excluded). On a cache hit `cached` is True, `latency_ms` is the lookup time and
    `cost_usd` is 0 (nothing was spent); the token counts still describe the answer."""

    text: str
    tokens_in: int
    tokens_out: int
    cost_usd: float
    latency_ms: float
    status: int
    cached: bool = False

    def replayed(self, lookup_ms: float) -> Completion:
        return Completion(
            self.text, self.tokens_in, self.tokens_out, 0.0, lookup_ms, self.status, True
        )


class Budget:
    """Token and cost ceilings for one run, shared by every concurrent request.

    Before a request is sent its worst case (estimated prompt tokens + max_tokens) is reserved, so
    many requests in flight cannot overshoot together; after it returns the reservation is
    replaced by what the provider reported.
    """

    def __init__(self, max_tokens: int | None = None, max_cost_usd: float | None = None) -> None:
        self.max_tokens = max_tokens
        self.max_cost_usd = max_cost_usd
        self.spent_tokens = 0
        self.spent_cost_usd = 0.0
        self._reserved_tokens = 0
        self._reserved_cost = 0.0
        self._lock = threading.Lock()

    def reserve(self, tokens: int, cost_usd: float) -> None:
        with self._lock:
            self._refuse_if_over(
                self.spent_tokens + self._reserved_tokens + tokens,
                self.spent_cost_usd + self._reserved_cost + cost_usd,
                f"the next request may need up to {tokens:,} tokens / ${cost_usd:.4f} "
                f"(prompt estimate + max_tokens; {self._reserved_tokens:,} tokens reserved by "
                "requests in flight)",
            )
            self._reserved_tokens += tokens
            self._reserved_cost += cost_usd

    def release(self, tokens: int, cost_usd: float) -> None:
        with self._lock:
            self._reserved_tokens = max(0, self._reserved_tokens - tokens)
            self._reserved_cost = max(0.0, self._reserved_cost - cost_usd)

    def charge(self, tokens: int, cost_usd: float) -> None:
        """Record what was actually spent; raises once the total is over a ceiling."""
        with self._lock:
            self.spent_tokens += tokens
            self.spent_cost_usd += cost_usd
            self._refuse_if_over(self.spent_tokens, self.spent_cost_usd, "after the last answer")

    def _refuse_if_over(self, tokens: int, cost: float, context: str) -> None:
        advice = "Raise the budget or sample fewer items (sample_per_suite)."
        if self.max_tokens is not None and tokens > self.max_tokens:
            raise BudgetExceeded(
                f"token budget of {self.max_tokens:,} exhausted: {self.spent_tokens:,} tokens "
                f"spent so far; {context}. {advice}"
            )
        if self.max_cost_usd is not None and cost > self.max_cost_usd:
            raise BudgetExceeded(
                f"cost budget of ${self.max_cost_usd:.4f} exhausted: ${self.spent_cost_usd:.4f} "
                f"spent so far; {context}. {advice}"
            )


TOKENS_PER_WORD = 1.3
EVALUATION_CONCURRENCY = 32  # an evaluation's calls in flight when the providers file sets none


def estimate_tokens(text: str) -> int:
    """Words x 1.3, rounded up: what a call costs when the provider reports no usage (a stream
    without `include_usage`); deterministic and close enough for cost comparisons."""
    return math.ceil(len(text.split()) * TOKENS_PER_WORD)


def request_parameters(manifest: ModelManifest) -> dict[str, Any]:
    """The manifest's decoding parameters as OpenAI request fields (unset ones left out)."""
    p = manifest.parameters
    params: dict[str, Any] = {
        "temperature": p.temperature,
        "top_p": p.top_p,
        "max_tokens": p.max_tokens,
    }
    if p.seed is not None:
        params["seed"] = p.seed
    if p.stop:
        params["stop"] = list(p.stop)
    return params


class _Pacer:
    """Spaces request starts `1 / per_s` apart: a provider's rate limit, kept by the sender so
    the evaluation does not spend its retries on 429s."""

    def __init__(self, per_s: float) -> None:
        self.interval = 1.0 / per_s
        self._next = 0.0

    async def wait(self) -> None:
        now = time.monotonic()
        start = max(now, self._next)
        self._next = start + self.interval  # no await before this line: no race in one loop
        if start > now:
            await asyncio.sleep(start - now)


class ProviderClient:
    """`async with ProviderClient(url) as client: await client.complete(manifest, text)`, or
    `ProviderClient.for_provider(name, config)` for a providers-file entry (key, TLS, limits).

    The credential is read when the client is entered (`credentials`), handed to the HTTP
    client and kept nowhere else: not in an attribute, a message or a repr.
    """

    def __init__(
        self,
        base_url: str,
        *,
        concurrency: int = EVALUATION_CONCURRENCY,
        timeout_s: float = 30.0,
        max_retries: int = 4,
        backoff_s: float = 0.1,
        budget: Budget | None = None,
        cache: ResponseCache | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        name: str | None = None,
        credentials: Callable[[], Mapping[str, str]] | None = None,
        key_source: str | None = None,
        tls: ssl.SSLContext | None = None,
        requests_per_s: float | None = None,
        api_root: str = "/v1",
    ) -> None:
        if concurrency < 1:
            raise ConfigError(f"concurrency must be at least 1, got {concurrency}")
        self.base_url = base_url.rstrip("/")
        self.name = name or self.base_url
        self.key_source = key_source
        self._credentials = credentials
        self._tls = tls
        self._api_root = api_root  # "/v1" under a bare origin; "" under an SDK-style base_url
        self._pacer = _Pacer(requests_per_s) if requests_per_s else None
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        # Exponential backoff, jittered so clients that failed together do not retry together.
        self.retry_policy = retries.RetryPolicy(
            delays_s=tuple(backoff_s * 2**n for n in range(max_retries)), jitter=0.5
        )
        self.budget = budget
        self.cache = cache
        self._transport = transport
        self._http: httpx.AsyncClient | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._manifests: dict[int, tuple[ModelManifest, str, dict[str, Any]]] = {}

    @classmethod
    def for_provider(
        cls,
        name: str,
        config: ProviderConfig,
        environ: Mapping[str, str] | None = None,
        **options: Any,
    ) -> ProviderClient:
        """The client for one providers-file entry; `options` as for the constructor."""
        options.setdefault("concurrency", config.concurrency or EVALUATION_CONCURRENCY)
        options.setdefault("timeout_s", config.timeout_s)
        options.setdefault("requests_per_s", config.requests_per_s)
        return cls(
            config.base_url,
            name=name,
            credentials=lambda: credential_headers(name, config, environ),
            key_source=config.key_source(),
            tls=ssl_context(name, config),
            api_root="",
            **options,
        )

    async def __aenter__(self) -> ProviderClient:
        limits = httpx.Limits(
            max_connections=self.concurrency, max_keepalive_connections=self.concurrency
        )
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=dict(self._credentials()) if self._credentials is not None else None,
            timeout=httpx.Timeout(self.timeout_s),
            limits=limits,
            transport=self._transport
            or AiohttpTransport(limit=self.concurrency, ssl_context=self._tls),
        )
        self._semaphore = asyncio.Semaphore(self.concurrency)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._http is not None:
            await self._http.aclose()
        self._http = None

    async def complete(self, manifest: ModelManifest, user_input: str) -> Completion:
        messages = [{"role": "user", "content": manifest.render(user_input)}]
        digest, params = self._prepared(manifest)
        key = None
        if self.cache is not None:
            started = time.perf_counter()
            key = self.cache.key(digest, messages, params)
            hit = self.cache.get(key)
            if hit is not None:
                return hit.replayed((time.perf_counter() - started) * 1000)
        payload = {"model": manifest.origin.model, "messages": messages, **params}
        reserved_tokens = math.ceil(len(messages[0]["content"]) / 4) + params["max_tokens"]
        reserved_cost = manifest.price.cost(
            reserved_tokens - params["max_tokens"], params["max_tokens"]
        )
        if self.budget is not None:
            self.budget.reserve(reserved_tokens, reserved_cost)
        try:
            status, body, latency_ms = await self._post_with_retries(payload)
        finally:
            if self.budget is not None:
                self.budget.release(reserved_tokens, reserved_cost)
        text, tokens_in, tokens_out = _parse(status, body)
        completion = Completion(
            text=text,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            cost_usd=manifest.price.cost(tokens_in, tokens_out),
            latency_ms=latency_ms,
            status=status,
        )
        if self.cache is not None and key is not None:
            self.cache.put(key, completion)
        if self.budget is not None:
            self.budget.charge(tokens_in + tokens_out, completion.cost_usd)
        return completion

    def _prepared(self, manifest: ModelManifest) -> tuple[str, dict[str, Any]]:
        """Digest and request parameters, once per manifest: the digest serialises the whole
        manifest and would otherwise dominate a cache replay. The manifest stays in the entry so
        its id() cannot be reused by another object."""
        entry = self._manifests.get(id(manifest))
        if entry is None or entry[0] is not manifest:
            if len(self._manifests) >= 64:  # a caller minting manifests per call must not leak
                self._manifests.clear()
            entry = (manifest, manifest.digest(), request_parameters(manifest))
            self._manifests[id(manifest)] = entry
        return entry[1], dict(entry[2])

    async def post(self, path: str, payload: dict[str, Any]) -> tuple[int, bytes, float]:
        """One POST under the API root (`/chat/completions`, `/moderations`, `/embeddings`) with
        this client's key, TLS, concurrency, pacing and retry policy: what the live checkers
        send. Returns the answering attempt's status, body and round trip (ms); raises as
        `complete` does (TransientProviderError after the retries, ProviderResponseError on a 4xx).
        """
        return await self._post_with_retries(payload, path)

    async def _post_with_retries(
        self, payload: dict[str, Any], path: str = "/chat/completions"
    ) -> tuple[int, bytes, float]:
        if self._http is None or self._semaphore is None:
            raise RuntimeError("use ProviderClient inside `async with` before calling complete()")
        http, semaphore = self._http, self._semaphore
        latency_ms = 0.0

        async def post() -> httpx.Response:
            nonlocal latency_ms
            async with semaphore:  # held per attempt, not while waiting to retry
                if self._pacer is not None:
                    await self._pacer.wait()
                started = time.perf_counter()
                response = await http.post(f"{self._api_root}{path}", json=payload)
                latency_ms = (time.perf_counter() - started) * 1000
                return response

        try:
            response = await retries.acall(post, self.retry_policy)
        except httpx.TimeoutException as exc:
            raise self._still_failing(
                f"timed out after {self.timeout_s} s ({type(exc).__name__})"
            ) from exc
        except httpx.TransportError as exc:
            raise self._still_failing(f"connection failed ({type(exc).__name__}: {exc})") from exc
        status = response.status_code
        if retries.is_retryable_status(status):
            raise self._still_failing(f"HTTP {status}: {_snippet(response.content)}")
        if status in (401, 403):
            raise self.rejected_key(status)
        if status >= 400:
            raise ProviderResponseError(
                f"{self.base_url} refused the request with HTTP {status}: "
                f"{_snippet(response.content)} (a retry will not help: check the "
                "model name and parameters in the manifest)"
            )
        return status, response.content, latency_ms

    def rejected_key(self, status: int) -> ProviderResponseError:
        """No body quoted: some providers echo part of the key they refused."""
        if self.key_source is None:
            return ProviderResponseError(
                f"provider {self.name} refused a request without a key (HTTP {status}): name "
                "one with api_key_env or api_key_file in the providers file"
            )
        return ProviderResponseError(
            f"provider {self.name} rejected the key from {self.key_source} (HTTP {status})"
        )

    async def get(self, path: str) -> tuple[int, bytes]:
        """One GET under the API root with the provider's key and TLS, no retry: preflight
        asks `/models`."""
        if self._http is None:
            raise RuntimeError("use ProviderClient inside `async with` before calling get()")
        response = await self._http.get(f"{self._api_root}{path}")
        return response.status_code, response.content

    def _still_failing(self, last: str) -> TransientProviderError:
        return TransientProviderError(
            f"{self.base_url} still failing after {self.max_retries + 1} attempts; last: {last}. "
            "Check the provider's health, or raise max_retries / timeout_s."
        )


def _snippet(body: bytes) -> str:
    text = body[:SNIPPET_CHARS].decode("utf-8", errors="replace")
    return repr(text + ("..." if len(body) > SNIPPET_CHARS else ""))


def _parse(status: int, body: bytes) -> tuple[str, int, int]:
    def refuse(why: str) -> ProviderResponseError:
        return ProviderResponseError(
            f"provider answered HTTP {status} but {why}: {_snippet(body)} "
            "(is the URL an OpenAI-compatible /v1 endpoint?)"
        )

    try:
        data = json.loads(body)
    except ValueError:
        raise refuse("the body is not JSON") from None
    try:
        content = data["choices"][0]["message"]["content"]
        usage = data["usage"]
        tokens_in, tokens_out = int(usage["prompt_tokens"]), int(usage["completion_tokens"])
    except (KeyError, IndexError, TypeError, ValueError):
        raise refuse("the body has no choices[0].message.content or usage token counts") from None
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise refuse("choices[0].message.content is not text")
    return content, tokens_in, tokens_out
