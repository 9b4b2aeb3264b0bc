"""An httpx transport that sends through aiohttp.

httpx stays the client API (retries, errors, MockTransport in tests), but its own connection pool
(httpcore) scans every pooled connection on each request: at 32-64 concurrent requests a client
process spends 6-9 ms of CPU per request and throughput collapses (measured in
benchmarks/bench_evaluation.py; the model service's forwarder saw the same). aiohttp's connector
does not, so the provider client sends through it.

TLS: the caller's context (a provider's CA bundle), else aiohttp's default (the system's CAs).
Proxies: HTTPS_PROXY / HTTP_PROXY / NO_PROXY (`env_proxy`), looked up once per origin, never
for a loopback host. aiohttp's own `trust_env` is off: it looks the proxy up again on a thread
for every request, proxies loopback too, and adds ~/.netrc credentials.
"""

from __future__ import annotations

import ipaddress
import ssl

import aiohttp
import httpx
from aiohttp.helpers import get_env_proxy_for_url
from yarl import URL

Origin = tuple[str, str, int | None]
Proxy = tuple[URL | None, aiohttp.BasicAuth | None]


def is_loopback(host: str | None) -> bool:
    """127.0.0.0/8, ::1, localhost and *.localhost: this machine."""
    if not host:
        return False
    host = host.strip("[]").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def env_proxy(url: URL) -> Proxy:
    """The proxy HTTPS_PROXY / HTTP_PROXY name for `url` (with its credentials, if the variable
    has any), or none: when NO_PROXY lists the host, or the host is this machine. A proxy
    elsewhere cannot reach this machine's 127.0.0.1, so the stack's sandbox and a local vLLM or
    Ollama keep answering behind a corporate proxy without a NO_PROXY entry (Go's HTTP client
    does the same)."""
    if is_loopback(url.host):
        return None, None
    try:
        return get_env_proxy_for_url(url)
    except LookupError:
        return None, None


class AiohttpTransport(httpx.AsyncBaseTransport):
    def __init__(self, limit: int = 100, ssl_context: ssl.SSLContext | None = None) -> None:
        self.limit = limit
        self.ssl_context = ssl_context
        self._session: aiohttp.ClientSession | None = None
        self._proxies: dict[Origin, Proxy] = {}

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self.limit, ttl_dns_cache=300, ssl=self.ssl_context or True
            )
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=True)
        return self._session

    def _proxy(self, url: httpx.URL) -> Proxy:
        origin = (url.scheme, url.host, url.port)
        if origin not in self._proxies:
            self._proxies[origin] = env_proxy(URL(str(url)))
        return self._proxies[origin]

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        timeout = aiohttp.ClientTimeout(
            sock_connect=timeouts.get("connect"),
            sock_read=timeouts.get("read"),
            total=None,
        )
        proxy, proxy_auth = self._proxy(request.url)
        try:
            async with self._client().request(
                request.method,
                str(request.url),
                proxy=proxy,
                proxy_auth=proxy_auth,
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
