"""A lean HTTP/1.1 keep-alive client for the model service's provider calls.

Why not aiohttp here: on 2 cores its ClientSession cost about 0.25 ms of CPU per call, more than
the uvicorn server in front of it, and the service makes one such call per request (two with a
mirror). This client writes each request in one `write`, parses the answer with httptools (the
C parser uvicorn already uses) and costs about 0.08 ms (`benchmarks/bench_dataplane.py` measures
all three forwarders). It does what a provider call needs and no more: POST with a body,
keep-alive pooling per origin, TLS, content-length, chunked or read-to-close bodies, a timeout,
and streamed answers (`stream`: the body chunk by chunk as it arrives, for SSE).
No redirects, proxies, cookies or compression.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import AsyncIterator, Mapping
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


class BodyStream:
    """A streamed answer: its status and headers at once, then its body chunk by chunk.

    The provider's bytes wait here until read; past `_HIGH_WATER` chunks the connection stops
    reading, so a slow client slows its own provider call instead of filling memory."""

    _HIGH_WATER = 64

    def __init__(self, connection: _Connection) -> None:
        self._connection: _Connection | None = connection
        self._chunks: deque[bytes | BaseException | None] = deque()  # None: the end
        self._arrived = asyncio.Event()
        self.status = 0
        self.retry_after: str | None = None
        self.complete = False  # the whole body was read

    def push(self, item: bytes | BaseException | None) -> None:
        self._chunks.append(item)
        self._arrived.set()
        if item is None or isinstance(item, BaseException):
            self._connection = None  # the connection may serve another request from now on
        elif len(self._chunks) > self._HIGH_WATER and self._connection is not None:
            self._connection.pause()

    async def next(self, timeout_s: float) -> bytes | None:
        """The next chunk; None at the end. A provider silent for `timeout_s` raises
        `TransientProviderError`, as does one that drops the connection mid-answer."""
        while not self._chunks:
            self._arrived.clear()
            try:
                async with asyncio.timeout(timeout_s):
                    await self._arrived.wait()
            except TimeoutError:
                raise TransientProviderError(
                    f"provider sent nothing for {timeout_s} s mid-answer"
                ) from None
        item = self._chunks.popleft()
        if len(self._chunks) < self._HIGH_WATER // 2 and self._connection is not None:
            self._connection.resume()
        if isinstance(item, BaseException):
            raise item
        if item is None:
            self.complete = True
        return item

    async def read(self, timeout_s: float) -> bytes:
        """The rest of the body (an error answer is short: read whole)."""
        parts = []
        while (chunk := await self.next(timeout_s)) is not None:
            parts.append(chunk)
        return b"".join(parts)


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
        self._stream: BodyStream | None = None  # set while a streamed answer is read
        self._head: asyncio.Future[BodyStream] | None = None
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
        if self._stream is not None:
            self._stream_lost(exc)
            return
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
        status = self._parser.get_status_code()
        if self._stream is not None and status >= 200:
            self._stream.status, self._stream.retry_after = status, self._retry_after
            if self._head is not None and not self._head.done():
                self._head.set_result(self._stream)

    def on_body(self, body: bytes) -> None:
        if self._stream is not None:
            self._stream.push(body)
        else:
            self._body.append(body)

    def on_message_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:  # an interim 1xx answer: the real one follows
            self._headers_done, self._body, self._retry_after = False, [], None
            return
        if self._stream is not None:
            stream, self._stream, self._head = self._stream, None, None
            stream.push(None)
            self.resume()
        else:
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

    def send_streaming(self, request: bytes) -> asyncio.Future[BodyStream]:
        """Like `send`, but the answer is handed over at its headers: the body follows
        through the returned `BodyStream`."""
        assert self._transport is not None
        self._head = asyncio.get_running_loop().create_future()
        self._stream = BodyStream(self)
        self._body, self._retry_after = [], None
        self._started = self._headers_done = False
        self._transport.write(request)
        return self._head

    def pause(self) -> None:
        if self._transport is not None and self._transport.is_reading():
            self._transport.pause_reading()

    def resume(self) -> None:
        if self._transport is not None and not self._transport.is_reading() and not self.closed:
            self._transport.resume_reading()

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()

    def _stream_lost(self, exc: Exception | None) -> None:
        stream, self._stream = self._stream, None
        head, self._head = self._head, None
        if stream is None:
            return
        if head is not None and not head.done():
            head.set_exception(
                _StaleConnection("connection closed before the answer")
                if not self._started
                else TransientProviderError(f"provider closed the connection: {exc}")
            )
        elif self._headers_done and not self._parser.should_keep_alive():
            stream.push(None)  # a body delimited by the connection's end
        else:
            stream.push(TransientProviderError("provider closed the connection mid-answer"))

    def _complete(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
            waiter.set_result(Reply(self._parser.get_status_code(), body, self._retry_after))

    def _fail(self, exc: Exception) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        head, self._head = self._head, None
        if head is not None and not head.done():
            head.set_exception(exc)
        elif self._stream is not None:
            self._stream.push(exc)


_Key = tuple[str, int, bool]  # host, port, TLS


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
        self._idle: dict[_Key, deque[_Connection]] = {}
        self._slots: dict[_Key, asyncio.Semaphore] = {}
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
        request, key, origin = self._prepare(url, body, headers, tls)
        slots = self._slots_of(key)
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

    @contextlib.asynccontextmanager
    async def stream(
        self,
        url: str,
        body: bytes,
        timeout_s: float,
        headers: Mapping[str, str] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> AsyncIterator[BodyStream]:
        """POST like `post`, yielding at the answer's headers; read the body with
        `BodyStream.next`. `timeout_s` bounds the wait for the headers and each later gap,
        not the whole answer (a long generation is not a slow provider). Leaving the block
        before the end closes the connection: the provider stops generating for nobody."""
        request, key, origin = self._prepare(url, body, headers, tls)
        async with self._slots_of(key):
            connection, stream = await self._open_stream(url, request, key, origin, timeout_s)
            try:
                yield stream
            finally:
                if not stream.complete:
                    connection.close()

    async def preconnect(
        self,
        url: str,
        count: int,
        headers: Mapping[str, str] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> int:
        """Open connections to `url`'s origin until `count` are idle; returns how many were
        opened. A version's first requests then skip the TCP and TLS handshakes: on a new
        pool (the shadow's, a new provider's) those land in the first window's tail."""
        _, key, origin = self._prepare(url, b"", headers, tls)
        idle = self._idle.setdefault(key, deque())
        wanted = max(0, min(count, self._max_connections) - len(idle))
        opened = await asyncio.gather(
            *(self._connect(origin, idle) for _ in range(wanted)), return_exceptions=True
        )
        connections = [c for c in opened if isinstance(c, _Connection)]
        idle.extend(connections)
        return len(connections)

    async def _open_stream(
        self, url: str, request: bytes, key: _Key, origin: _Origin, timeout_s: float
    ) -> tuple[_Connection, BodyStream]:
        idle = self._idle.setdefault(key, deque())
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    connection = idle.pop() if idle else await self._connect(origin, idle)
                    if connection.closed:
                        continue
                    try:
                        return connection, await connection.send_streaming(request)
                    except _StaleConnection:
                        continue
                    except BaseException:
                        connection.close()
                        raise
        except TimeoutError as exc:
            raise TransientProviderError(f"provider {url} did not answer in {timeout_s} s") from exc
        except (OSError, _StaleConnection) as exc:
            raise TransientProviderError(f"provider {url} unreachable: {exc}") from exc

    def _prepare(
        self,
        url: str,
        body: bytes,
        headers: Mapping[str, str] | None,
        tls: ssl.SSLContext | None,
    ) -> tuple[bytes, _Key, _Origin]:
        if self._closed:
            raise RuntimeError("Http1Client used after aclose()")
        origin = self._origins.get(url)
        if origin is None or origin.headers is not headers or origin.context is not tls:
            origin = self._origin(url, headers, tls)
        request = b"%s%d\r\n\r\n%s" % (origin.head, len(body), body)
        return request, (origin.host, origin.port, origin.tls), origin

    def _slots_of(self, key: _Key) -> asyncio.Semaphore:
        slots = self._slots.get(key)
        if slots is None:
            slots = self._slots[key] = asyncio.Semaphore(self._max_connections)
        return slots

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
