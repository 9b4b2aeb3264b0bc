"""The model service's Unix-socket listener: Envoy's way in, served by a lean HTTP/1.1 protocol.

uvicorn's HTTP protocol costs ~0.11 ms of CPU per request on this machine class (a bare ASGI
app that answers at once), against ~0.04 ms for a raw asyncio protocol; with a 100% mirror each
user request crosses two services, so that gap is paid twice. This protocol serves the same
ASGI app (`public.HotPath`) on the socket Envoy sends to and does only what that hop needs:

- one request at a time per connection (a pipelined one waits its turn), keep-alive unless the
  request or the answer says `connection: close`; no idle timeout (Envoy's pool closes what it
  no longer wants, so no request races a server-side close);
- the body is read whole before the app runs (Envoy's buffer filter already holds it); a
  declared or read body over `max_body_bytes` is answered 413 at once and the connection closed,
  so one request never holds more than the cap in memory;
- the answer's head and first body chunk leave in one write; a body the app streams
  (`more_body`) goes out chunked; write flow control is honoured;
- after the body, `receive()` waits until the client leaves or the answer is complete, then
  answers `http.disconnect` (a streamed answer stops when Envoy hangs up);
- a request that makes the app raise is answered 500 if nothing was sent yet, else the
  connection is closed.

It registers its connections and tasks in uvicorn's server state, so uvicorn's graceful
shutdown waits for them as for its own, before the app's lifespan ends. uvicorn still serves the
TCP public port (direct callers, health checks) and the admin port.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from email.utils import formatdate
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

import httptools
from starlette.types import ASGIApp, Message

from canaryflow.dataplane.envoy_config import body_limit_message
from canaryflow.dataplane.forwarder import ServiceError

log = logging.getLogger("canaryflow.serve")

_ASGI = {"version": "3.0", "spec_version": "2.3"}
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_date: tuple[int, bytes] = (0, b"")


def _date_header() -> bytes:
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, b"date: " + formatdate(now, usegmt=True).encode() + b"\r\n")
    return _date[1]


class _Exchange:
    """One request and the state of its answer."""

    __slots__ = (
        "body",
        "chunked",
        "complete",
        "ended",
        "head",
        "headers",
        "keep_alive",
        "method",
        "size",
        "started",
        "url",
        "version",
    )

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.size = 0
        self.method = "GET"
        self.version = "1.1"
        self.keep_alive = True
        self.started = False  # http.response.start seen
        self.head = b""  # the answer's head, written with the first body chunk
        self.chunked = False
        self.complete = False  # the whole answer was written
        self.ended: asyncio.Future[None] | None = None  # answer complete or client gone


class SocketHttp(asyncio.Protocol):
    """One connection of the Unix-socket listener (see the module docstring)."""

    def __init__(self, app: ASGIApp, state: Any, max_body_bytes: int) -> None:
        self.app = app
        self.state = state  # uvicorn's ServerState: .connections, .tasks
        self.max_body_bytes = max_body_bytes
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.server: tuple[str, None] | None = None
        self.reading: _Exchange | None = None  # being parsed
        self.waiting: deque[_Exchange] = deque()  # parsed, not yet handed to the app
        self.active: _Exchange | None = None  # the app runs it
        self.closed = False
        self.drained: asyncio.Future[None] | None = None  # set while writing is paused

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport
        sockname = transport.get_extra_info("sockname")
        self.server = (sockname, None) if isinstance(sockname, str) else None
        self.state.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.state.connections.discard(self)
        for exchange in (self.active, *self.waiting):
            if exchange is not None and exchange.ended is not None and not exchange.ended.done():
                exchange.ended.set_result(None)
        self.waiting.clear()
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(400, "upgrades are not served here")
        except httptools.HttpParserError:
            self._refuse(400, "malformed HTTP request")

    def pause_writing(self) -> None:
        self.drained = self.loop.create_future()

    def resume_writing(self) -> None:
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)
        self.drained = None

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown: close now if idle, else after the current answer."""
        if self.active is None:
            if self.transport is not None:
                self.transport.close()
        else:
            self.active.keep_alive = False

    # -- httptools callbacks

    def on_message_begin(self) -> None:
        self.reading = _Exchange()

    def on_url(self, url: bytes) -> None:
        assert self.reading is not None
        self.reading.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.reading is not None
        self.reading.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        exchange = self.reading
        assert exchange is not None
        exchange.method = self.parser.get_method().decode("ascii")
        exchange.version = self.parser.get_http_version()
        exchange.keep_alive = self.parser.should_keep_alive()
        for name, value in exchange.headers:
            if name == b"content-length" and value.isdigit():
                if int(value) > self.max_body_bytes:
                    self._too_large()
                break

    def on_body(self, body: bytes) -> None:
        exchange = self.reading
        if exchange is None or self.closed:
            return
        exchange.size += len(body)
        if exchange.size > self.max_body_bytes:
            self._too_large()
            return
        exchange.body.append(body)

    def on_message_complete(self) -> None:
        exchange, self.reading = self.reading, None
        if exchange is None or self.closed:
            return
        self.waiting.append(exchange)
        if self.active is None:
            self._next()
        elif self.transport is not None:
            self.transport.pause_reading()  # pipelined: parse no further until its turn

    # -- running the app

    def _next(self) -> None:
        if not self.waiting or self.closed:
            return
        exchange = self.active = self.waiting.popleft()
        exchange.ended = self.loop.create_future()
        task = self.loop.create_task(self._run(exchange))
        self.state.tasks.add(task)
        task.add_done_callback(self.state.tasks.discard)

    async def _run(self, exchange: _Exchange) -> None:
        url = exchange.url
        path, _, query = url.partition(b"?")
        scope = {
            "type": "http",
            "asgi": _ASGI,
            "http_version": exchange.version,
            "server": self.server,
            "client": None,
            "scheme": "http",
            "method": exchange.method,
            "root_path": "",
            "path": unquote(path.decode("latin-1")) if b"%" in path else path.decode("latin-1"),
            "raw_path": path,
            "query_string": query,
            "headers": exchange.headers,
        }
        body = exchange.body[0] if len(exchange.body) == 1 else b"".join(exchange.body)
        exchange.body = []
        delivered = False

        async def receive() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            assert exchange.ended is not None
            await exchange.ended
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            await self._send(exchange, message)

        try:
            await self.app(scope, receive, send)  # type: ignore[arg-type]
        except Exception:
            log.exception("the app failed on %s %s", exchange.method, path.decode("latin-1"))
            if not exchange.started and not self.closed:
                exchange.keep_alive = False
                await self._send_error(exchange, 500, "internal error")
        finally:
            if not exchange.complete and self.transport is not None:
                self.transport.close()  # an answer left half way cannot be framed: end it
            self._finished(exchange)

    async def _send(self, exchange: _Exchange, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            if exchange.started:
                raise RuntimeError("http.response.start sent twice")
            exchange.started = True
            status = int(message["status"])
            head = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"")), _date_header()]
            length = False
            for name, value in message.get("headers", ()):
                lower = name.lower()
                if lower == b"content-length":
                    length = True
                elif lower == b"transfer-encoding":
                    continue  # the framing is this protocol's to choose
                elif lower == b"connection" and value.lower() == b"close":
                    exchange.keep_alive = False
                    continue  # added below, once
                head += [name, b": ", value, b"\r\n"]
            if not exchange.keep_alive:
                head.append(b"connection: close\r\n")
            exchange.chunked = not length
            exchange.head = b"".join(head)
            return
        if kind != "http.response.body":
            raise RuntimeError(f"unexpected ASGI message {kind!r}")
        if not exchange.started:
            raise RuntimeError("http.response.body before http.response.start")
        if exchange.complete or self.closed or self.transport is None:
            return  # the client left, or the answer is done: nothing to write to
        data: bytes = message.get("body", b"")
        more = bool(message.get("more_body", False))
        if exchange.method == "HEAD":
            data = b""
        out = b""
        if exchange.head:
            if not more and exchange.chunked:  # the whole body in one message: say its length
                exchange.chunked = False
                out = exchange.head + b"content-length: %d\r\n\r\n" % len(data)
            else:
                out = exchange.head + (b"transfer-encoding: chunked\r\n\r\n" if exchange.chunked
                                       else b"\r\n")  # fmt: skip
            exchange.head = b""
        if exchange.chunked:
            if data:
                out += b"%x\r\n%s\r\n" % (len(data), data)
            if not more:
                out += b"0\r\n\r\n"
        else:
            out += data
        if out:
            self.transport.write(out)
        if not more:
            exchange.complete = True
        elif self.drained is not None:
            await self.drained

    async def _send_error(self, exchange: _Exchange, status: int, message: str) -> None:
        body = ServiceError(status, message, "internal_error").body({})
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await self._send(exchange, {"type": "http.response.start", "status": status,
                                    "headers": headers})  # fmt: skip
        await self._send(exchange, {"type": "http.response.body", "body": body})

    def _finished(self, exchange: _Exchange) -> None:
        if exchange.ended is not None and not exchange.ended.done():
            exchange.ended.set_result(None)
        if self.active is exchange:
            self.active = None
        if self.closed or self.transport is None:
            return
        if not exchange.keep_alive:
            self.transport.close()
            return
        if self.waiting:
            self._next()
        else:
            self.transport.resume_reading()

    # -- refusals straight from the protocol

    def _too_large(self) -> None:
        """413 with the cap (as `public.refuse_too_large`), then close: the rest is not read."""
        body = ServiceError(413, body_limit_message(self.max_body_bytes), "request_too_large")
        self._refuse(413, body=body.body({}))

    def _refuse(self, status: int, message: str = "", body: bytes | None = None) -> None:
        if self.closed or self.transport is None:
            return
        self.closed = True  # nothing more is parsed or answered on this connection
        if self.active is None:  # else its answer is under way: just close after it
            if body is None:
                body = ServiceError(status, message, "invalid_request").body({})
            self.transport.write(
                b"HTTP/1.1 %d %s\r\n%scontent-type: application/json\r\ncontent-length: %d\r\n"
                b"connection: close\r\n\r\n%s"
                % (status, _REASONS.get(status, b""), _date_header(), len(body), body)
            )
        self.transport.close()


async def serve_unix_socket(
    app: ASGIApp, sock: Any, state: Any, max_body_bytes: int
) -> asyncio.base_events.Server:
    """Serve `app` on the bound Unix socket `sock` (see `serve.bind_unix`)."""
    loop = asyncio.get_running_loop()
    return await loop.create_unix_server(
        lambda: SocketHttp(app, state, max_body_bytes), sock=sock, backlog=2048
    )
