"""An open-loop HTTP/1.1 load generator that costs as little CPU as it can.

The generator shares two cores with everything it measures, so every microsecond it spends is
taken from the path under test. Requests leave on a fixed schedule (checked every millisecond,
as wrk2 does) whether or not earlier ones returned, and each latency counts from the scheduled
send time, so a stall shows up instead of hiding (no coordinated omission). No task, future or
timer per request: protocol callbacks only, answers parsed by httptools.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httptools


@dataclass
class Tally:
    sent: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)


class _Connection(asyncio.Protocol):
    def __init__(self, generator: OpenLoop) -> None:
        self.generator = generator
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.WriteTransport | None = None
        self.scheduled: float | None = None  # the request in flight, by its scheduled time

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a TCP transport writes

    def send(self, request: bytes, scheduled: float) -> None:
        assert self.transport is not None
        self.scheduled = scheduled
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._finish(ok=False)
            assert self.transport is not None
            self.transport.close()

    def on_message_complete(self) -> None:
        self._finish(ok=self.parser.get_status_code() == 200)
        if self.parser.should_keep_alive():
            self.generator.idle.append(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(ok=False)
        if self in self.generator.idle:
            self.generator.idle.remove(self)

    def _finish(self, ok: bool) -> None:
        if self.scheduled is not None:
            self.generator.record(self.scheduled, ok)
            self.scheduled = None


class OpenLoop:
    """POST the same body to one URL at `rate` requests per second for `duration_s`."""

    def __init__(self, url: str, body: bytes) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.request = (
            f"POST {parts.path or '/'} HTTP/1.1\r\nhost: {parts.netloc}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        ).encode() + body
        self.idle: list[_Connection] = []
        self.tally = Tally()
        self._pending = 0
        self._opening: set[asyncio.Task[None]] = set()  # the loop keeps only weak references

    def record(self, scheduled: float, ok: bool) -> None:
        self._pending -= 1
        if ok:
            self.tally.latencies_ms.append((time.perf_counter() - scheduled) * 1000)
        else:
            self.tally.errors += 1

    async def run(self, rate: float, duration_s: float, drain_s: float = 10.0) -> Tally:
        loop = asyncio.get_running_loop()
        total = int(rate * duration_s)
        start = time.perf_counter()
        sent = 0
        while sent < total:
            due = min(total, int((time.perf_counter() - start) * rate) + 1)
            while sent < due:
                scheduled = start + sent / rate
                if self.idle:
                    self.idle.pop().send(self.request, scheduled)
                else:
                    task = loop.create_task(self._open_and_send(scheduled))
                    self._opening.add(task)
                    task.add_done_callback(self._opening.discard)
                sent += 1
                self._pending += 1
            await asyncio.sleep(0.001)
        deadline = time.perf_counter() + drain_s
        while self._pending > 0 and time.perf_counter() < deadline:
            await asyncio.sleep(0.005)
        self.tally.errors += max(0, self._pending)  # unanswered by the end of the drain
        self.tally.sent = total
        for connection in self.idle:
            if connection.transport is not None:
                connection.transport.close()
        return self.tally

    async def _open_and_send(self, scheduled: float) -> None:
        try:
            _, connection = await asyncio.get_running_loop().create_connection(
                lambda: _Connection(self), self.host, self.port
            )
        except OSError:
            self.record(scheduled, ok=False)
            return
        connection.send(self.request, scheduled)
