"""Batched writes to the store off the event loop: the hot path queues, a worker thread writes.

Kept apart from the store itself, which is plain synchronous SQL usable from any thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from canaryflow.contracts import RequestRecord
from canaryflow.dataplane.store import Store
from canaryflow.errors import ConfigError

__all__ = ["BatchWriter"]

log = logging.getLogger(__name__)


class BatchWriter:
    """Queue records on the event loop, write them in batches from a worker thread.

    The service calls `submit` on its hot path: it never blocks, and a full queue answers False
    (the caller counts a drop) rather than slowing a user down. Start `run()` as a task; `aclose()`
    stops it after a last flush. A failed batch is logged and counted, and the loop goes on.
    """

    def __init__(
        self,
        store: Store,
        max_queue: int = 10_000,
        flush_every_s: float = 0.2,
        max_batch: int = 2_000,
    ) -> None:
        if max_queue < 1 or max_batch < 1 or flush_every_s <= 0:
            raise ConfigError("BatchWriter needs max_queue >= 1, max_batch >= 1, flush_every_s > 0")
        self._store = store
        self._max_queue = max_queue
        self._max_batch = max_batch
        self._flush_every_s = flush_every_s
        self._pending: list[RequestRecord] = []
        self._closing = False
        self._running = False
        self._wake: asyncio.Event | None = None
        self._done: asyncio.Event | None = None
        self._flush_lock: asyncio.Lock | None = None
        self.written = 0
        self.dropped = 0
        self.failed = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    def submit(self, record: RequestRecord) -> bool:
        if self._closing or len(self._pending) >= self._max_queue:
            self.dropped += 1
            return False
        self._pending.append(record)
        if len(self._pending) >= self._max_batch and self._wake is not None:
            self._wake.set()
        return True

    async def run(self) -> None:
        self._wake, self._done, self._running = asyncio.Event(), asyncio.Event(), True
        try:
            while not self._closing:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._flush_every_s)
                self._wake.clear()
                await self.flush()
            await self.flush()
        finally:
            self._running = False
            self._done.set()

    async def flush(self) -> int:
        """Write everything queued so far; returns how many records were written."""
        if self._flush_lock is None:
            self._flush_lock = asyncio.Lock()
        async with self._flush_lock:
            batch, self._pending = self._pending, []
            written = 0
            for start in range(0, len(batch), self._max_batch):
                chunk = batch[start : start + self._max_batch]
                try:
                    await asyncio.to_thread(self._store.write, chunk)
                except Exception:
                    self.failed += len(chunk)
                    log.exception("could not write %d request records to the store", len(chunk))
                else:
                    written += len(chunk)
            self.written += written
            return written

    async def aclose(self) -> None:
        """Stop taking records; `run` (or this call, if none runs) writes what is left."""
        self._closing = True
        if self._running and self._wake is not None and self._done is not None:
            self._wake.set()
            await self._done.wait()
        else:
            await self.flush()
