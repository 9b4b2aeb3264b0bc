"""A streamed chat completion read as it passes through: events out whole, the answer assembled.

OpenAI-compatible providers stream `text/event-stream`: events separated by a blank line, each
`data: <chunk JSON>`, the last `data: [DONE]`. The model service forwards every event to its
client the moment the event is complete (never the whole stream at once), and meanwhile builds
what a record needs: the text, tool calls, usage, finish reason and when tokens arrived.

The parser is linear in the bytes fed (each byte is scanned once for a separator) and bounded:
an event larger than `max_event_bytes` is the provider's garbage, not something to buffer.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from canaryflow.errors import TransientProviderError

DEFAULT_MAX_EVENT_BYTES = 1024 * 1024
_BLANK_LINE = re.compile(rb"\n\r?\n")  # ends an event: "\n\n" or "\r\n\r\n"


@dataclass(frozen=True, slots=True)
class Event:
    """One complete event as received (`raw`, forwarded as is) and its parsed chunk."""

    raw: bytes
    chunk: dict[str, Any] | None  # None: a comment, keep-alive or `[DONE]`
    done: bool = False


class MalformedStream(TransientProviderError):
    """The provider's stream is not an OpenAI chat-completions stream."""


@dataclass(slots=True)
class StreamAssembly:
    """The answer so far. `feed` takes bytes as they arrive and returns the events they
    completed; `token_at` times come from the caller's clock (`now`), so the first one minus the
    request's start is the time to first token."""

    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES
    text: list[str] = field(default_factory=list)
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    usage: dict[str, Any] | None = None
    finish_reason: str | None = None
    done: bool = False
    first_token_at: float | None = None
    last_token_at: float | None = None
    token_events: int = 0
    _buffer: bytearray = field(default_factory=bytearray)
    _scanned: int = 0  # bytes of `_buffer` already searched for a blank line

    def feed(self, data: bytes, now: float) -> list[Event]:
        self._buffer += data
        events, start = [], 0
        # Resume where the last feed's search stopped (less one byte: a separator may straddle
        # two feeds), so every byte is searched about once however the stream is cut.
        scan = max(0, self._scanned - 2)
        while (match := _BLANK_LINE.search(self._buffer, scan)) is not None:
            end = match.end()
            events.append(self._event(bytes(self._buffer[start:end]), now))
            start = scan = end
        del self._buffer[:start]
        self._scanned = len(self._buffer)
        if len(self._buffer) > self.max_event_bytes:
            raise MalformedStream(
                f"provider stream event over {self.max_event_bytes} bytes without an end"
            )
        return events

    def rest(self) -> bytes:
        """Bytes after the last complete event (a stream cut mid-event)."""
        return bytes(self._buffer)

    @property
    def content(self) -> str:
        return "".join(self.text)

    def assembled_tool_calls(self) -> list[dict[str, Any]]:
        return [self.tool_calls[i] for i in sorted(self.tool_calls)]

    def inter_token_ms(self) -> float | None:
        """Mean gap between token-bearing events after the first; None with fewer than two."""
        if self.token_events < 2 or self.first_token_at is None or self.last_token_at is None:
            return None
        return (self.last_token_at - self.first_token_at) * 1000 / (self.token_events - 1)

    # ------------------------------------------------------------------ parsing

    def _event(self, raw: bytes, now: float) -> Event:
        lines = raw.replace(b"\r\n", b"\n").split(b"\n")
        data = [line[5:].removeprefix(b" ") for line in lines if line.startswith(b"data:")]
        if not data:
            return Event(raw, None)  # a comment (": keep-alive") or an event without data
        payload = b"\n".join(data)
        if payload.strip() == b"[DONE]":
            self.done = True
            return Event(raw, None, done=True)
        try:
            chunk = json.loads(payload)
        except ValueError as exc:
            raise MalformedStream(f"provider stream event is not JSON: {exc}") from None
        if not isinstance(chunk, dict):
            raise MalformedStream("provider stream event is not a JSON object")
        if "error" in chunk:
            raise MalformedStream(f"provider stream failed: {_error_text(chunk['error'])}")
        self._take(chunk, now)
        return Event(raw, chunk)

    def _take(self, chunk: dict[str, Any], now: float) -> None:
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return
        choice = choices[0]
        if choice.get("finish_reason"):
            self.finish_reason = str(choice["finish_reason"])
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            return
        tokens = False
        content = delta.get("content")
        if isinstance(content, str) and content:
            self.text.append(content)
            tokens = True
        for call in delta.get("tool_calls") or ():
            if isinstance(call, dict):
                self._tool_delta(call)
                tokens = True
        if tokens:
            self.first_token_at = self.first_token_at or now
            self.last_token_at = now
            self.token_events += 1

    def _tool_delta(self, call: dict[str, Any]) -> None:
        """Tool calls stream as fragments keyed by `index`: id and name once, arguments in
        pieces to be concatenated."""
        index = call.get("index", len(self.tool_calls))
        index = index if isinstance(index, int) else len(self.tool_calls)
        known = self.tool_calls.setdefault(
            index, {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
        )
        if call.get("id"):
            known["id"] = call["id"]
        function = call.get("function")
        if isinstance(function, dict):
            if isinstance(function.get("name"), str):
                known["function"]["name"] += function["name"]
            if isinstance(function.get("arguments"), str):
                known["function"]["arguments"] += function["arguments"]


def _error_text(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error)[:200]
    return str(error)[:200]


def error_event(message: str, kind: str, status: int) -> bytes:
    """The OpenAI-shaped error a stream ends with when it cannot finish (the 200 is sent)."""
    error = {"error": {"message": message, "type": kind, "code": status}}
    return b"data: " + json.dumps(error).encode() + b"\n\n"
