"""An httpx transport that sends through aiohttp.

httpx stays the client API (retries, errors, MockTransport in tests), but its own connection pool
(httpcore) scans every pooled connection on each request: at 32-64 concurrent requests a client
process spends 6-9 ms of CPU per request and throughput collapses (measured in
benchmarks/bench_evaluation.py; the model service's forwarder saw the same). aiohttp's connector
does not, so the provider client sends through it.

TLS: the caller's context (a provider's CA bundle), else aiohttp's default (the system's CAs).
`trust_env` makes aiohttp honour HTTPS_PROXY / HTTP_PROXY / NO_PROXY, as httpx would.
"""

from __future__ import annotations

import ssl

import aiohttp
import httpx


class AiohttpTransport(httpx.AsyncBaseTransport):
    def __init__(self, limit: int = 100, ssl_context: ssl.SSLContext | None = None) -> None:
        self.limit = limit
        self.ssl_context = ssl_context
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self.limit, ttl_dns_cache=300, ssl=self.ssl_context or True
            )
            self._session = aiohttp.ClientSession(
                connector=connector, auto_decompress=True, trust_env=True
            )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        timeout = aiohttp.ClientTimeout(
            sock_connect=timeouts.get("connect"),
            sock_read=timeouts.get("read"),
            total=None,
        )
        try:
            async with self._client().request(
                request.method,
                str(request.url),
                headers=[(k, v) for k, v in request.headers.items() if k != "host"],
                data=await request.aread(),
                timeout=timeout,
                allow_redirects=False,
            ) as answer:
                content = await answer.read()
                headers = [
                    (k, v) for k, v in answer.headers.items() if k.lower() != "content-encoding"
                ]
                return httpx.Response(
                    answer.status, headers=headers, content=content, request=request
                )
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise httpx.ReadTimeout(str(exc) or "timed out", request=request) from exc
        except aiohttp.ClientConnectionError as exc:
            raise httpx.ConnectError(str(exc), request=request) from exc
        except aiohttp.ClientError as exc:
            raise httpx.TransportError(str(exc), request=request) from exc

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
