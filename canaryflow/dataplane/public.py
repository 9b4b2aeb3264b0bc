"""The model service's two listeners: the public one (OpenAI routes only, bodies bounded) and the
admin one (warm-up, metrics), served by one uvicorn server on two sockets.

Admin routes on the public port would let any client warm versions or read every version's
traffic; the public port answers 404 for them. The body cap is checked before a byte is read
(a declared Content-Length) or while reading (a chunked body), so one request cannot hold more
than the cap plus uvicorn's 64 KiB read buffer in memory.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.types import ASGIApp, Receive, Scope, Send

from canaryflow.dataplane.envoy_config import body_limit_message
from canaryflow.dataplane.forwarder import ServiceError

CHAT_PATH = "/v1/chat/completions"


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes | None:
    """The request body, or None as soon as it is known to be over `limit` bytes."""
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            return None
    chunks, size = [], 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


async def refuse_too_large(send: Send, limit: int) -> None:
    """413 with what to do, never the body; `connection: close` so the rest is not read."""
    body = ServiceError(413, body_limit_message(limit), "request_too_large").body({})
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(body)),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class HotPath:
    """The public listener: `POST /v1/chat/completions` straight to the service (no router on
    the hot path); `/health` and `/v1/models` through Starlette. `admin` is the admin app."""

    def __init__(self, chat: ASGIApp, app: Starlette, admin: Starlette) -> None:
        self.chat, self.app, self.admin = chat, app, admin

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == CHAT_PATH and scope["method"] == "POST":
            await self.chat(scope, receive, send)
        else:
            await self.app(scope, receive, send)


class Listeners:
    """Dispatch by the local port a request came in on: one server, one lifespan, one set of
    signal handlers for both listeners."""

    def __init__(self, public: HotPath, admin_port: int) -> None:
        self.public, self.admin_port = public, admin_port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        server = scope.get("server") or (None, None)
        if scope["type"] != "lifespan" and server[1] == self.admin_port:
            await self.public.admin(scope, receive, send)
        else:
            await self.public(scope, receive, send)
