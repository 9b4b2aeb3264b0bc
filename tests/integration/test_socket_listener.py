"""The model service's Unix-socket listener (Envoy's way in): framing, keep-alive, the body cap,
streaming, hang-ups and failures, over a real Unix socket."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httptools

from canaryflow.dataplane.serve import bind_unix
from canaryflow.dataplane.socket_listener import serve_unix_socket

LIMIT = 1000
seen: dict[str, Any] = {}


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    path = scope["path"]
    message = await receive()
    body = message["body"]
    if path == "/boom":
        raise RuntimeError("planted")
    if path == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for part in (b"data: 1\n\n", b"data: 2\n\n"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    if path == "/hang":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        seen["hang"] = await receive()  # the client leaves: http.disconnect
        return
    answer = json.dumps(
        {"path": path, "query": scope["query_string"].decode(), "body": body.decode(),
         "headers": {k.decode(): v.decode() for k, v in scope["headers"]}}
    ).encode()  # fmt: skip
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(answer))]
    if path == "/close":
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": answer})


@asynccontextmanager
async def listening(tmp_path: Path) -> AsyncIterator[tuple[Path, Any]]:
    path = tmp_path / "sockets" / "s.sock"
    state = SimpleNamespace(connections=set(), tasks=set())
    server = await serve_unix_socket(app, bind_unix(path), state, LIMIT)
    try:
        yield path, state
    finally:
        server.close()
        for connection in list(state.connections):
            connection.shutdown()


class Answers:
    def __init__(self) -> None:
        self.done: list[tuple[int, dict[bytes, bytes], bytes]] = []
        self.parser = httptools.HttpResponseParser(self)
        self.headers: dict[bytes, bytes] = {}
        self.body = b""

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done.append((self.parser.get_status_code(), self.headers, self.body))
        self.headers, self.body = {}, b""


async def exchange(path: Path, raw: bytes, answers: int = 1) -> tuple[list[Any], bool]:
    """Send raw bytes, read until `answers` answers (or the end); also: was it closed?"""
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(raw)
    got = Answers()
    closed = False
    while len(got.done) < answers:
        data = await asyncio.wait_for(reader.read(65536), 5)
        if not data:
            closed = True
            break
        got.parser.feed_data(data)
    if not closed:
        try:
            closed = await asyncio.wait_for(reader.read(1), 0.2) == b""
        except TimeoutError:
            closed = False
    writer.close()
    return got.done, closed


def post(target: str, body: bytes, extra: str = "") -> bytes:
    return (
        f"POST {target} HTTP/1.1\r\nhost: s\r\ncontent-length: {len(body)}\r\n{extra}\r\n".encode()
        + body
    )


def test_keep_alive_pipelining_and_the_request_as_sent(tmp_path: Path) -> None:
    async def run() -> None:
        async with listening(tmp_path) as (path, _):
            raw = post("/a%20b?x=1", b'{"q": 1}', "x-canaryflow-role: canary\r\n") + post("/c", b"")
            answers, closed = await exchange(path, raw, answers=2)
            assert not closed, "keep-alive"
            (status, headers, body), (second, _, other) = answers
            seen_by_app = json.loads(body)
            assert status == 200 and headers[b"content-type"] == b"application/json"
            assert b"date" in headers
            assert seen_by_app["path"] == "/a b" and seen_by_app["query"] == "x=1"
            assert seen_by_app["body"] == '{"q": 1}'
            assert seen_by_app["headers"]["x-canaryflow-role"] == "canary"
            assert second == 200 and json.loads(other)["path"] == "/c"
            # The app's connection: close, and a client's, end the connection after the answer.
            assert (await exchange(path, post("/close", b"")))[1]
            assert (await exchange(path, post("/x", b"", "connection: close\r\n")))[1]

    asyncio.run(run())


def test_bodies_over_the_cap_are_413_and_the_connection_closed(tmp_path: Path) -> None:
    async def run() -> None:
        async with listening(tmp_path) as (path, _):
            declared = b"POST /a HTTP/1.1\r\nhost: s\r\ncontent-length: 5000\r\n\r\n"
            [(status, _, body)], closed = await exchange(path, declared)
            assert status == 413 and closed
            assert f"limit of {LIMIT} bytes" in json.loads(body)["error"]["message"]
            chunk = b"x" * 600
            chunked = (
                b"POST /a HTTP/1.1\r\nhost: s\r\ntransfer-encoding: chunked\r\n\r\n"
                + b"%x\r\n%s\r\n" % (len(chunk), chunk) * 2
                + b"0\r\n\r\n"
            )
            [(status, _, body)], closed = await exchange(path, chunked)
            assert status == 413 and closed and b"x" * 10 not in body
            within = b"POST /a HTTP/1.1\r\nhost: s\r\ntransfer-encoding: chunked\r\n\r\n"
            within += b"%x\r\n%s\r\n0\r\n\r\n" % (len(chunk), chunk)
            [(status, _, body)], _ = await exchange(path, within)
            assert status == 200 and json.loads(body)["body"] == chunk.decode()
            [(status, _, _)], closed = await exchange(path, b"NOT HTTP\r\n\r\n")
            assert status == 400 and closed

    asyncio.run(run())


def test_streams_are_chunked_and_a_hang_up_reaches_the_app(tmp_path: Path) -> None:
    async def run() -> None:
        async with listening(tmp_path) as (path, state):
            [(status, headers, body)], closed = await exchange(path, post("/stream", b""))
            assert status == 200 and headers[b"transfer-encoding"] == b"chunked"
            assert body == b"data: 1\n\ndata: 2\n\n" and not closed
            reader, writer = await asyncio.open_unix_connection(str(path))
            writer.write(post("/hang", b""))
            assert b"data: 1" in await asyncio.wait_for(reader.read(4096), 5)
            writer.close()
            for _ in range(100):
                if "hang" in seen:
                    break
                await asyncio.sleep(0.02)
            assert seen["hang"] == {"type": "http.disconnect"}
            for _ in range(100):
                if not state.connections and not state.tasks:
                    break
                await asyncio.sleep(0.02)
            assert not state.tasks

    asyncio.run(run())


def test_a_failing_app_answers_500_and_closes(tmp_path: Path) -> None:
    async def run() -> None:
        async with listening(tmp_path) as (path, _):
            [(status, _, body)], closed = await exchange(path, post("/boom", b""))
            assert status == 500 and closed
            assert json.loads(body)["error"]["type"] == "internal_error"
            assert b"planted" not in body

    asyncio.run(run())
