"""The model service's record worker: checks, masks and stores each request off the hot path.

The checks are the live checkers of the service's policy (`live_checks.LiveChecks`): an answered
user request is offered to them, its record held until their verdicts are in, then written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from canaryflow.contracts import CheckerConfig, ProvidersFile, RequestRecord, Role
from canaryflow.dataplane.live_checks import LiveChecks
from canaryflow.dataplane.metrics import ServiceMetrics
from canaryflow.dataplane.pii import ASYNC_THRESHOLD, mask_pii_async
from canaryflow.dataplane.probes import MAX_REFERENCE, ProbeScorer
from canaryflow.dataplane.store import row_of
from canaryflow.dataplane.watermarks import writer_id
from canaryflow.errors import ConfigError

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
    probe: str | None = None  # a synthetic probe's `<suite>/<item id>` (`probes.py`)
    streamed: bool = False
    ttft_ms: float | None = None  # None: not streamed (the record then takes latency_ms)
    inter_token_ms: float | None = None
    # The parsed request body, by reference (never copied): the checkers' context (its system
    # messages or `context` field). None until parsed.
    body: Mapping[str, Any] | None = None
    # Set by the live checks (`live_checks.LiveChecks`) before the record is written.
    checked: bool = False
    unchecked: bool = False
    checks: str = ""
    hallucination: bool | None = None
    unsafe: bool | None = None
    injection_leak: bool | None = None
    refusal: bool | None = None


def scaled(configs: Sequence[CheckerConfig], scale: float) -> list[CheckerConfig]:
    """The checkers with their sample rates (and per-role floors) multiplied by `scale`
    (`serve --check-sample`, kept for older scripts); 0 leaves none."""
    if not 0.0 <= scale <= 1.0:
        raise ConfigError(f"check_sample must be in [0, 1], got {scale}")
    if scale == 0:
        return []
    if scale == 1:
        return list(configs)
    return [
        c.model_copy(
            update={
                "sample_rate": c.sample_rate * scale,
                "candidate_sample_rate": c.rate_for("canary") * scale,
                "min_per_s": c.min_per_s * scale,
            }
        )
        for c in configs
    ]


class RecordWorker:
    """Turns pending requests into stored `RequestRecord`s, off the request path.

    `submit` never waits: a full queue drops the record and counts it. The worker takes batches,
    offers answered user requests to the live checkers (`checkers`, their providers from
    `providers`; `check_sample` scales every sample rate) and holds those records until the
    verdicts are in, masks PII, hashes user ids (with `salt`, else the store's), updates the
    quality metrics, and writes the batch to the store in a thread (SQLite I/O must not block
    the event loop). Its watermark never passes a held record.
    """

    def __init__(
        self,
        service: str,
        metrics: ServiceMetrics,
        store: StoreLike | None,
        check_sample: float = 1.0,
        queue_size: int = 10_000,
        flush_every_s: float = 0.2,
        batch_size: int = 500,
        salt: bytes | None = None,
        *,
        checkers: Sequence[CheckerConfig] = (),
        providers: ProvidersFile | None = None,
        check_queue_size: int = 1000,
        checkers_in_process: bool = False,
        probes: ProbeScorer | None = None,
    ) -> None:
        self.service = service
        self.metrics = metrics
        self.store = store
        self.flush_every_s = flush_every_s
        self.batch_size = batch_size
        self.probes = probes if probes is not None else ProbeScorer()
        configs = scaled(checkers, check_sample)
        self.live = (
            LiveChecks(
                configs,
                providers,
                metrics,
                queue_size=check_queue_size,
                in_process=checkers_in_process,
            )
            if configs
            else None
        )
        if salt is None:  # without a store nothing is kept: any salt will do
            salt = store.user_salt if store is not None else secrets.token_bytes(32)
        self._salt = salt
        self._queue: asyncio.Queue[Pending] = asyncio.Queue(maxsize=queue_size)
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
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        if self.live is not None:
            await self.live.start()
        while True:
            try:
                first = await asyncio.wait_for(self._queue.get(), self.idle_mark_s)
            except TimeoutError:  # idle: everything submitted so far is stored or held
                if self._queue.empty():
                    await self._write_batch([], time.time())
                continue
            self._held = [first]
            if self._queue.qsize() < self.batch_size:
                await asyncio.sleep(self.flush_every_s)  # let a batch gather
            while len(self._held) < self.batch_size and not self._queue.empty():
                self._held.append(self._queue.get_nowait())
            # Drained: everything submitted before this moment is in the batch. (Under steady
            # load the queue is never empty after a write, so the mark is taken here.)
            drained_at = time.time() if self._queue.empty() else None
            await self._write_batch(self._held, drained_at)

    async def _write_batch(self, taken: list[Pending], drained_at: float | None) -> None:
        """Offer what was taken to the checkers, write what is not held plus the held records
        whose verdicts are in, then move the watermark (never past a held record)."""
        batch = taken
        if self.live is not None:
            batch = []
            for i, pending in enumerate(taken, 1):
                if not self._check(pending):
                    batch.append(pending)
                if i % _SLICE == 0:
                    await asyncio.sleep(0)  # a batch's offers, in slices: users' answers go first
            batch.extend(self.live.take_ready())
        self._held = []
        if batch:
            # Shielded: closing the worker stops it between batches, never halfway through one.
            self._writing = asyncio.ensure_future(self._process(batch))
            await asyncio.shield(self._writing)
        if drained_at is not None:
            oldest = self.live.oldest_at() if self.live is not None else None
            # Just before the oldest held record: marks mean "everything before this is stored".
            at = drained_at if oldest is None else min(drained_at, oldest - 1e-3)
            await self._mark(at)

    def _check(self, pending: Pending) -> bool:
        """Offer an answered user request to the checkers: True when its record is held."""
        if pending.status != 200 or pending.synthetic or self.live is None:
            return False
        try:
            return self.live.submit(pending, pending.role.value)
        except Exception:  # a bad body must not stop the worker: written unchecked
            log.exception("offering request %s to the checkers failed", pending.request_id)
            return False

    async def _mark(self, at: float) -> None:
        """Every record completed before `at` is stored (the caller saw the queue drained and
        no record held from before `at`)."""
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
        probes = [p.probe for p in batch if p.probe is not None]
        if probes:  # a suite's first probe reads its file: in a thread, once per suite
            await asyncio.to_thread(self.probes.prepare, probes)
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
        if p.checked and not p.synthetic:  # the quality series are the users' (as requests)
            raised = [
                name
                for name in ("hallucination", "unsafe", "injection_leak", "refusal")
                if getattr(p, name) is True
            ]
            self.metrics.observe_check(p.version, p.role.value, raised)
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
            checked=p.checked,
            hallucination=p.hallucination,
            unsafe=p.unsafe,
            injection_leak=p.injection_leak,
            refusal=p.refusal,
            unchecked=p.unchecked,
            checks=p.checks,
            synthetic=p.synthetic,
            streamed=p.streamed,
            ttft_ms=p.latency_ms if p.ttft_ms is None else p.ttft_ms,
            inter_token_ms=p.inter_token_ms,
            probe=None if p.probe is None else p.probe[:MAX_REFERENCE],
            probe_passed=(
                None if p.probe is None else self.probes.verdict(p.probe, p.status, p.response)
            ),
        )

    async def aclose(self, settle_s: float = 2.0) -> None:
        """Stop the worker, then write what it held and what is still queued: records waiting
        for verdicts get up to `settle_s` for them (the missing ones count as failed)."""
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
        if self.live is not None:
            rest = [p for p in rest if not self._check(p)]
            deadline = time.monotonic() + settle_s
            while self.live.holding and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            rest.extend(self.live.release_all())
            await self.live.aclose()
        if rest:
            await self._process(rest)
