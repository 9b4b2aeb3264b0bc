"""The model service's record worker: checks, masks and stores each request off the hot path."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from canaryflow.contracts import RequestRecord, Role
from canaryflow.dataplane.metrics import ServiceMetrics
from canaryflow.dataplane.pii import ASYNC_THRESHOLD, mask_pii_async
from canaryflow.dataplane.store import row_of
from canaryflow.dataplane.watermarks import writer_id
from canaryflow.quality.checkers import QualityChecks, QualityFlags

log = logging.getLogger("canaryflow.serve")


_SLICE = 16


class StoreLike(Protocol):
    @property
    def user_salt(self) -> bytes: ...
    def write_rows(self, rows: list[dict[str, Any]]) -> None: ...


@dataclass(slots=True)
class Pending:
    """What the request path hands over: raw text, not yet masked, checked or validated."""

    request_id: str
    at: float
    user: str | None = None
    version: str = "unknown"
    role: Role = Role.STABLE
    status: int = 500
    latency_ms: float = 0.0
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0
    prompt: str = ""
    response: str = ""
    synthetic: bool = False  # Envoy's synthetic listener sent it: stored, never a user's
    streamed: bool = False
    ttft_ms: float | None = None  # None: not streamed (the record then takes latency_ms)
    inter_token_ms: float | None = None


class RecordWorker:
    """Turns pending requests into stored `RequestRecord`s, off the request path.

    `submit` never waits: a full queue drops the record and counts it. The worker takes batches,
    runs the sampled quality checks, masks PII, hashes user ids (with `salt`, else the store's),
    updates the quality metrics, and writes the batch to the store in a thread (SQLite I/O must
    not block the event loop).
    """

    def __init__(
        self,
        service: str,
        metrics: ServiceMetrics,
        store: StoreLike | None,
        check_sample: float,
        queue_size: int = 10_000,
        flush_every_s: float = 0.2,
        batch_size: int = 500,
        checks: QualityChecks | None = None,
        salt: bytes | None = None,
    ) -> None:
        self.service = service
        self.metrics = metrics
        self.store = store
        self.check_sample = check_sample
        self.flush_every_s = flush_every_s
        self.batch_size = batch_size
        self._checks = checks
        if salt is None:  # without a store nothing is kept: any salt will do
            salt = store.user_salt if store is not None else secrets.token_bytes(32)
        self._salt = salt
        self._queue: asyncio.Queue[Pending] = asyncio.Queue(maxsize=queue_size)
        self._random = random.Random()
        self._task: asyncio.Task[None] | None = None
        # Taken off the queue but not yet handed to a write: `aclose` must still write these.
        self._held: list[Pending] = []
        self._writing: asyncio.Future[None] | None = None
        self.written = 0
        self.writer = writer_id(service)
        self.idle_mark_s = max(flush_every_s, 0.2)  # the watermark's heartbeat while idle

    def submit(self, pending: Pending) -> bool:
        try:
            self._queue.put_nowait(pending)
        except asyncio.QueueFull:
            self.metrics.record_dropped()
            return False
        return True

    def start(self) -> None:
        if self._checks is None and self.check_sample > 0:
            self._checks = QualityChecks()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                first = await asyncio.wait_for(self._queue.get(), self.idle_mark_s)
            except TimeoutError:  # idle: everything submitted so far is stored
                if self._queue.empty():
                    await self._mark(time.time())
                continue
            self._held = [first]
            if self._queue.qsize() < self.batch_size:
                await asyncio.sleep(self.flush_every_s)  # let a batch gather
            while len(self._held) < self.batch_size and not self._queue.empty():
                self._held.append(self._queue.get_nowait())
            # Drained: everything submitted before this moment is in the batch. (Under steady
            # load the queue is never empty after a write, so the mark is taken here.)
            drained_at = time.time() if self._queue.empty() else None
            batch, self._held = self._held, []
            # Shielded: closing the worker stops it between batches, never halfway through one.
            self._writing = asyncio.ensure_future(self._process(batch))
            await asyncio.shield(self._writing)
            if drained_at is not None:
                await self._mark(drained_at)

    async def _mark(self, at: float) -> None:
        """Every record completed before `at` is stored (the caller saw the queue drained)."""
        watermarks = getattr(self.store, "watermarks", None)
        if watermarks is None:
            return
        try:
            await asyncio.to_thread(watermarks.mark, self.writer, self.service, at)
        except Exception:
            log.exception("moving the records watermark failed; windows will wait for it")

    async def _process(self, batch: list[Pending]) -> None:
        # Checks, masking and building the rows run on the loop in slices of ~0.1-0.5 ms; the
        # thread only runs the SQL. Python work in a thread holds the GIL for up to its 5 ms
        # switch interval at a time, and that showed up in the users' p99.
        # A text over pii.ASYNC_THRESHOLD (4 KB) is masked in ~1 ms slices with the loop given
        # back between them, still on the loop: 24 KB dense with look-alikes takes ~15 ms of
        # CPU, 64 KB ~40 ms, which no user should wait for in one piece.
        self.metrics.flush()  # the request counters and latencies noted on the request path
        rows = []
        for i, pending in enumerate(batch, 1):
            record = self._record(pending)
            if max(len(record.prompt), len(record.response)) > ASYNC_THRESHOLD:
                masked = {
                    "prompt": await mask_pii_async(record.prompt),
                    "response": await mask_pii_async(record.response),
                }
                rows.append(row_of(record.model_copy(update=masked), salt=self._salt, masked=True))
            else:
                rows.append(row_of(record, salt=self._salt))
            if i % _SLICE == 0:
                await asyncio.sleep(0)
        if self.store is not None:
            await asyncio.to_thread(self._write, rows)

    def _write(self, rows: list[dict[str, Any]]) -> None:
        assert self.store is not None
        try:
            self.store.write_rows(rows)
            self.written += len(rows)
        except Exception:
            log.exception("writing %d request records failed; they are dropped", len(rows))
            for _ in rows:
                self.metrics.record_dropped()

    def _record(self, p: Pending) -> RequestRecord:
        flags = QualityFlags()
        checked = p.status == 200 and self._random.random() < self.check_sample
        if checked:
            if self._checks is None:
                self._checks = QualityChecks()
            flags = self._checks.run(p.prompt, p.response)
            if not p.synthetic:  # the quality series are the users' (as the request counts)
                self.metrics.observe_check(p.version, p.role.value, flags.raised())
        return RequestRecord(
            request_id=p.request_id,
            at=datetime.fromtimestamp(p.at, UTC),
            service=self.service,
            version=p.version,
            role=p.role,
            user=p.user,
            status=p.status,
            latency_ms=p.latency_ms,
            tokens_in=p.tokens_in,
            tokens_out=p.tokens_out,
            cost_usd=p.cost_usd,
            prompt=p.prompt,  # `row_of` masks PII before anything reaches the store
            response=p.response,
            checked=checked,
            hallucination=flags.hallucination,
            unsafe=flags.unsafe,
            injection_leak=flags.injection_leak,
            refusal=flags.refusal,
            synthetic=p.synthetic,
            streamed=p.streamed,
            ttft_ms=p.latency_ms if p.ttft_ms is None else p.ttft_ms,
            inter_token_ms=p.inter_token_ms,
        )

    async def aclose(self) -> None:
        """Stop the worker, then write what it held and what is still queued."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._writing is not None:
            await self._writing
        rest, self._held = self._held, []
        while not self._queue.empty():
            rest.append(self._queue.get_nowait())
        if rest:
            await self._process(rest)
