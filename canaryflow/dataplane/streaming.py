"""Relay a streamed completion: the client gets each event the moment it is complete, the
record gets the whole answer (text, tool calls, usage, time to first token).

Once the 200 and its first bytes are out, a failure can no longer change the status: a provider
that breaks mid-stream or sends garbage ends the client's stream with an OpenAI-shaped error
event (what OpenAI itself sends) and is recorded as a 502. A client that hangs up cancels the
provider call at once (its connection is closed, so the provider stops generating) and is
recorded as 499, nginx's "client closed request": not an error of the model.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

from starlette.types import Receive, Send

from canaryflow.contracts import Price
from canaryflow.dataplane.forwarder import (
    Forwarder,
    ServiceError,
    StreamedAnswer,
    Upstream,
    provider_error,
)
from canaryflow.dataplane.recording import Pending
from canaryflow.dataplane.sse import StreamAssembly, error_event
from canaryflow.errors import TransientProviderError
from canaryflow.providers.client import estimate_tokens

CLIENT_CLOSED = 499
_ERROR_BODY_BYTES = 64 * 1024  # a provider's error answer is read whole up to this size
_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


@dataclass(frozen=True, slots=True)
class StreamCall:
    """One streamed provider call, as the service prepared it."""

    forwarder: Forwarder
    upstream: Upstream
    payload: bytes
    timeout_s: float
    pass_usage: bool  # the client asked for the usage chunk; else it is read, not passed on
    price: Price
    started: float  # perf_counter() when the request arrived


async def relay_stream(
    call: StreamCall, pending: Pending, out: dict[str, str], receive: Receive, send: Send
) -> list[dict[str, Any]]:
    """Stream the provider's answer to the client; fill `pending`; return the tool calls.

    Raises `ServiceError` only before anything was sent (the provider refused or is down): the
    caller answers it as JSON, as for an unstreamed request."""
    assembly = StreamAssembly()
    try:
        with call.upstream.admission():
            pending.status = await _relay(call, assembly, out, receive, send)
    except TransientProviderError as exc:
        raise ServiceError(502, str(exc), "provider_unavailable") from exc
    _fill(pending, assembly, call)
    return assembly.assembled_tool_calls()


async def _relay(
    call: StreamCall, assembly: StreamAssembly, out: dict[str, str], receive: Receive, send: Send
) -> int:
    """The provider's stream to the client; the status to record."""
    async with call.forwarder.stream(
        call.upstream.url,
        call.payload,
        call.timeout_s,
        call.upstream.headers,
        call.upstream.tls,
    ) as answer:
        if answer.status != 200:
            body = await _error_body(answer, call.timeout_s)
            raise provider_error(answer.status, body, answer.retry_after, call.upstream)
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in out.items()]
        await send(
            {"type": "http.response.start", "status": 200, "headers": headers + _SSE_HEADERS}
        )
        return await _pump_until_hang_up(answer, call, assembly, receive, send)


async def _error_body(answer: StreamedAnswer, timeout_s: float) -> bytes:
    parts, size = [], 0
    while size < _ERROR_BODY_BYTES and (chunk := await answer.next(timeout_s)) is not None:
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)[:_ERROR_BODY_BYTES]


async def _pump_until_hang_up(
    answer: StreamedAnswer,
    call: StreamCall,
    assembly: StreamAssembly,
    receive: Receive,
    send: Send,
) -> int:
    """Pump until the stream ends or the client leaves; the status to record."""
    pump = asyncio.ensure_future(_pump(answer, call, assembly, send))
    hang_up = asyncio.ensure_future(_hang_up(receive))
    try:
        await asyncio.wait({pump, hang_up}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        pump.cancel()  # no-op when done; else the client left, or this request was cancelled
        hang_up.cancel()
        await asyncio.gather(pump, hang_up, return_exceptions=True)  # failures read below
    if not pump.cancelled() and pump.exception() is None:
        return 200
    if hang_up.done() and not hang_up.cancelled():
        return CLIENT_CLOSED
    failure = pump.exception() if not pump.cancelled() else None
    if isinstance(failure, TransientProviderError):
        status, kind, message = 502, "provider_error", call.upstream.redact(str(failure))
    else:
        status, kind, message = 500, "internal_error", f"relaying the stream failed: {failure!r}"
    await send({"type": "http.response.body", "body": error_event(message, kind, status)})
    return status


async def _pump(
    answer: StreamedAnswer, call: StreamCall, assembly: StreamAssembly, send: Send
) -> None:
    while (chunk := await answer.next(call.timeout_s)) is not None:
        for event in assembly.feed(chunk, time.perf_counter()):
            if event.chunk is not None and not call.pass_usage and _usage_only(event.chunk):
                continue  # the service asked for it, the client did not
            await send({"type": "http.response.body", "body": event.raw, "more_body": True})
    if assembly.rest().strip():  # a last event ended by the connection, not a blank line
        for event in assembly.feed(b"\n\n", time.perf_counter()):
            await send({"type": "http.response.body", "body": event.raw, "more_body": True})
    if not (assembly.done or assembly.finish_reason):
        raise TransientProviderError("provider ended the stream before it finished the answer")
    await send({"type": "http.response.body", "body": b""})


async def _hang_up(receive: Receive) -> None:
    """Returns when the client disconnects (the request body was read whole before)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _usage_only(chunk: dict[str, Any]) -> bool:
    return "usage" in chunk and not chunk.get("choices")


def _fill(pending: Pending, assembly: StreamAssembly, call: StreamCall) -> None:
    """The record's fields from the assembled answer; tokens estimated without usage."""
    pending.streamed = True
    calls = assembly.assembled_tool_calls()
    pending.response = assembly.content or (json.dumps(calls) if calls else "")
    if assembly.first_token_at is not None:
        pending.ttft_ms = (assembly.first_token_at - call.started) * 1000
    pending.inter_token_ms = assembly.inter_token_ms()
    usage = assembly.usage or {}
    pending.tokens_in = int(usage.get("prompt_tokens") or 0) or estimate_tokens(pending.prompt)
    pending.tokens_out = int(usage.get("completion_tokens") or 0) or estimate_tokens(
        pending.response
    )
    pending.cost_usd = call.price.cost(pending.tokens_in, pending.tokens_out)
