"""The model service's record worker against a real SQLite store: it never makes the hot path
wait, drops (and counts) rather than blocks, and writes everything it accepted on close."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from canaryflow.dataplane.metrics import ServiceMetrics
from canaryflow.dataplane.pii import MAX_CHARS
from canaryflow.dataplane.recording import Pending, RecordWorker
from canaryflow.dataplane.store import Store, hash_user
from tests.waiting import async_wait_for

SERVICE = "svc"


def pending(n: int) -> Pending:
    return Pending(request_id=f"r{n}", at=time.time(), version="1", status=200, prompt="hi")


def stored(store: Store) -> int:
    now = datetime.now(UTC)
    return store.count(SERVICE, now - timedelta(hours=1), now + timedelta(hours=1))


def dropped(metrics: ServiceMetrics) -> float:
    return metrics.records_dropped.labels(SERVICE)._value.get()


def worker(store: Store, **options: float) -> tuple[RecordWorker, ServiceMetrics]:
    metrics = ServiceMetrics(SERVICE)
    return RecordWorker(SERVICE, metrics, store, check_sample=0.0, **options), metrics  # type: ignore[arg-type]


async def test_records_are_written_in_the_background(tmp_path: Path) -> None:
    store = Store(tmp_path / "r.db")
    recorder, _ = worker(store, flush_every_s=0.05)
    recorder.start()
    assert all(recorder.submit(pending(n)) for n in range(300))
    await async_wait_for("300 records written", lambda: recorder.written >= 300, 5)
    assert stored(store) == 300
    await recorder.aclose()
    store.close()


async def test_a_full_queue_drops_and_counts_and_close_writes_the_rest(tmp_path: Path) -> None:
    store = Store(tmp_path / "r.db")
    recorder, metrics = worker(store, queue_size=10)  # not started: nothing drains the queue
    accepted = [recorder.submit(pending(n)) for n in range(15)]
    assert accepted == [True] * 10 + [False] * 5
    assert dropped(metrics) == 5
    await recorder.aclose()
    assert stored(store) == 10
    store.close()


async def test_a_locked_database_never_blocks_the_event_loop(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    store = Store(path)
    recorder, metrics = worker(store, flush_every_s=0.02)
    recorder.start()
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another process holding the write lock
    assert all(recorder.submit(pending(n)) for n in range(40))
    # The worker takes the batch off the queue and starts writing it. Were that write on the
    # event loop, this coroutine could not run again until it ended (after sqlite's 30 s busy
    # timeout): seeing the queue empty and nothing written yet shows the loop is free.
    await async_wait_for("the worker to take the batch", lambda: recorder._queue.empty(), 5)
    for n in range(40, 50):  # the hot path keeps queueing meanwhile
        assert recorder.submit(pending(n))
        await asyncio.sleep(0)
    assert recorder.written == 0, "the write finished while the lock was held"
    blocker.execute("COMMIT")
    blocker.close()
    await async_wait_for("all 50 records written", lambda: recorder.written >= 40, 40)
    await recorder.aclose()
    assert (recorder.written, dropped(metrics), stored(store)) == (50, 0, 50)
    store.close()


async def test_closing_while_a_batch_gathers_still_writes_it(tmp_path: Path) -> None:
    store = Store(tmp_path / "r.db")
    recorder, _ = worker(store, flush_every_s=60)  # the batch would wait a minute to gather
    recorder.start()
    assert recorder.submit(pending(1))
    await async_wait_for("the worker to hold the record", lambda: recorder._queue.empty(), 5)
    await recorder.aclose()
    assert stored(store) == 1
    store.close()


async def test_user_ids_are_hashed_and_long_texts_masked_without_holding_the_loop(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "r.db")
    recorder, _ = worker(store, flush_every_s=0.01)
    # ~60 KB each, dense with look-alikes: ~40 ms of masking per text, ~150 ms per batch.
    hostile = ("+44 20 7946 0958 " * 600 + "jane@example.com 078-05-1120 ") * 6
    assert len(hostile) < MAX_CHARS
    short = Pending(request_id="s", at=time.time(), version="1", status=200, user="alice")
    longs = [
        Pending(request_id=f"l{n}", at=time.time(), version="1", status=200, user="alice",
                prompt=hostile, response=hostile)
        for n in range(2)
    ]  # fmt: skip
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:  # another user's request would need the loop this often
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    recorder.start()
    assert all(recorder.submit(p) for p in [short, *longs])
    await async_wait_for("the records written", lambda: recorder.written >= 3, 20)
    done.set()
    await task
    await recorder.aclose()
    now = datetime.now(UTC)
    records = {r.request_id: r for r in store.records(SERVICE, now - timedelta(hours=1), now)}
    alice = hash_user("alice", store.user_salt)
    assert alice is not None and alice.startswith("u_")
    assert {r.user for r in records.values()} == {alice}
    for text in (records["l0"].prompt, records["l1"].response):
        assert "jane@example.com" not in text and "078-05-1120" not in text
        assert "7946" not in text
        assert text.count("[EMAIL]") == 6 and text.count("[SSN]") == 6
    # Masked in one go, a batch would hold the loop ~150 ms; in slices, a few ms at most.
    assert max(gaps) < 0.05, f"the loop waited {max(gaps) * 1000:.0f} ms"
    store.close()
