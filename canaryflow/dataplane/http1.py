"""A lean HTTP/1.1 keep-alive client for the model service's provider calls.

Why not aiohttp here: on 2 cores its ClientSession cost about 0.25 ms of CPU per call, more than
the uvicorn server in front of it, and the service makes one such call per request (two with a
mirror). This client writes each request in one `write`, parses the answer with httptools (the
C parser uvicorn already uses) and costs about 0.08 ms (`benchmarks/bench_dataplane.py` measures
all three forwarders). It does what a provider call needs and no more: POST with a body,
keep-alive pooling per origin, TLS, content-length, chunked or read-to-close bodies, a timeout.
No redirects, proxies, cookies or compression.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools

from canaryflow.errors import ConfigError, TransientProviderError


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes
    retry_after: str | None = None


@dataclass(frozen=True, slots=True)
class _Origin:
    host: str
    port: int
    tls: bool
    head: bytes  # request line and fixed headers, up to the content-length value
    headers: Mapping[str, str] | None  # the caller's extra headers this head was made with
    context: ssl.SSLContext | None  # the caller's TLS context; None: the client's


class _StaleConnection(ConnectionError):
    """A pooled connection closed before any byte of the answer: safe to send again."""


class _Connection(asyncio.Protocol):
    def __init__(self, idle: deque[_Connection]) -> None:
        self._idle = idle
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[Reply] | None = None
        self._body: list[bytes] = []
        self._header: bytes = b""
        self._retry_after: str | None = None
        self._started = False
        self._headers_done = False
        self.closed = False

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # a TCP transport

    def data_received(self, data: bytes) -> None:
        self._started = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(TransientProviderError(f"provider sent a malformed HTTP answer: {exc}"))
            self.close()

    def eof_received(self) -> bool | None:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self in self._idle:
            self._idle.remove(self)
        if self._waiter is None or self._waiter.done():
            return
        if self._headers_done and not self._parser.should_keep_alive():
            self._complete()  # a body delimited by the connection's end
        elif not self._started:
            self._fail(_StaleConnection("connection closed before the answer"))
        else:
            self._fail(TransientProviderError(f"provider closed the connection mid-answer: {exc}"))

    # -- httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"retry-after":
            self._retry_after = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self._headers_done = True

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:  # an interim 1xx answer: the real one follows
            self._headers_done, self._body, self._retry_after = False, [], None
            return
        self._complete()
        if self._parser.should_keep_alive():
            self._idle.append(self)
        else:
            self.close()

    # -- the client's side

    def send(self, request: bytes) -> asyncio.Future[Reply]:
        assert self._transport is not None
        self._waiter = asyncio.get_running_loop().create_future()
        self._body, self._retry_after = [], None
        self._started = self._headers_done = False
        self._transport.write(request)
        return self._waiter

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()

    def _complete(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
            waiter.set_result(Reply(self._parser.get_status_code(), body, self._retry_after))

    def _fail(self, exc: Exception) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)


class Http1Client:
    """Keep-alive connections per origin, at most `max_connections` open per origin."""

    def __init__(
        self,
        max_connections: int = 512,
        connect_timeout_s: float = 5.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._max_connections = max_connections
        self._connect_timeout_s = connect_timeout_s
        self._origins: dict[str, _Origin] = {}
        self._idle: dict[tuple[str, int, bool], deque[_Connection]] = {}
        self._slots: dict[tuple[str, int, bool], asyncio.Semaphore] = {}
        self._ssl = ssl_context
        self._closed = False

    async def start(self) -> None:
        self._closed = False

    async def post(
        self,
        url: str,
        body: bytes,
        timeout_s: float,
        headers: Mapping[str, str] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> Reply:
        """POST `body` as JSON with `headers` (a provider's credential: written into the request
        head kept per URL, never logged) over `tls` (None: the client's context). An HTTP error
        status is a `Reply`; an unreachable or slow provider raises `TransientProviderError`."""
        if self._closed:
            raise RuntimeError("Http1Client.post() after aclose()")
        origin = self._origins.get(url)
        if origin is None or origin.headers is not headers or origin.context is not tls:
            origin = self._origin(url, headers, tls)
        request = b"%s%d\r\n\r\n%s" % (origin.head, len(body), body)
        key = (origin.host, origin.port, origin.tls)
        slots = self._slots.get(key)
        if slots is None:
            slots = self._slots[key] = asyncio.Semaphore(self._max_connections)
        try:
            async with asyncio.timeout(timeout_s), slots:
                idle = self._idle.setdefault(key, deque())
                while idle:
                    connection = idle.pop()
                    if connection.closed:
                        continue
                    try:
                        return await self._exchange(connection, request)
                    except _StaleConnection:
                        continue  # the server dropped it while idle: nothing was processed
                return await self._exchange(await self._connect(origin, idle), request)
        except TimeoutError as exc:
            raise TransientProviderError(f"provider {url} did not answer in {timeout_s} s") from exc
        except (OSError, _StaleConnection) as exc:
            raise TransientProviderError(f"provider {url} unreachable: {exc}") from exc

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            while idle:
                idle.pop().close()

    async def _exchange(self, connection: _Connection, request: bytes) -> Reply:
        waiter = connection.send(request)
        try:
            return await waiter
        except BaseException:
            stale = (
                waiter.done()
                and not waiter.cancelled()
                and isinstance(waiter.exception(), _StaleConnection)
            )
            if not stale:
                connection.close()  # a timed-out or broken exchange leaves the stream unusable
            raise

    async def _connect(self, origin: _Origin, idle: deque[_Connection]) -> _Connection:
        loop = asyncio.get_running_loop()
        context = (origin.context or self._ssl_context()) if origin.tls else None
        async with asyncio.timeout(self._connect_timeout_s):
            _, connection = await loop.create_connection(
                lambda: _Connection(idle), origin.host, origin.port, ssl=context
            )
        return connection

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    def _origin(
        self, url: str, headers: Mapping[str, str] | None, context: ssl.SSLContext | None
    ) -> _Origin:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"provider URL {url!r} must look like http(s)://host[:port]/path")
        tls = parts.scheme == "https"
        port = parts.port or (443 if tls else 80)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        extra = ""
        for name, value in (headers or {}).items():
            if any(c in name + value for c in "\r\n\0"):
                raise ConfigError(f"provider header {name!r} holds a line break or NUL")
            extra += f"{name}: {value}\r\n"
        head = (
            f"POST {path} HTTP/1.1\r\nhost: {parts.netloc}\r\n{extra}"
            "content-type: application/json\r\naccept: application/json\r\ncontent-length: "
        ).encode()
        origin = self._origins[url] = _Origin(parts.hostname, port, tls, head, headers, context)
        return origin
