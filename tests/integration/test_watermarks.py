"""A window is read only once every live record writer has stored what completed before its end."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from canaryflow.dataplane.metrics import ServiceMetrics
from canaryflow.dataplane.recording import Pending, RecordWorker
from canaryflow.dataplane.store import Store

SERVICE = "svc"


def stored(store: Store) -> int:
    now = datetime.now(UTC)
    return store.count(SERVICE, now - timedelta(hours=1), now + timedelta(hours=1))


def test_no_live_writer_means_incomplete(tmp_path: Path) -> None:
    store = Store(tmp_path / "w.db")
    assert store.watermarks.lowest(SERVICE, alive_since=0.0) is None
    now = time.time()
    assert not store.watermarks.wait_until(SERVICE, now, alive_since=now - 1, timeout_s=0.2)


def test_the_lowest_live_writer_decides_and_a_silent_one_is_not_waited_for(
    tmp_path: Path,
) -> None:
    marks = Store(tmp_path / "w.db").watermarks
    now = time.time()
    marks.mark("slow", SERVICE, now - 5)
    between = time.time()
    while time.time() <= between:  # the next beat is strictly later
        pass
    marks.mark("fast", SERVICE, now + 5)
    assert marks.lowest(SERVICE, alive_since=between - 60) == now - 5
    assert not marks.wait_until(SERVICE, now, alive_since=between - 60, timeout_s=0.1)
    # "slow" has not beaten since `between`: it is gone, only "fast" is waited for
    assert marks.wait_until(SERVICE, now, alive_since=between, timeout_s=0.1)


async def test_the_mark_passes_a_record_only_once_it_is_stored(tmp_path: Path) -> None:
    store = Store(tmp_path / "w.db")
    worker = RecordWorker(SERVICE, ServiceMetrics(SERVICE), store, check_sample=0.0,
                          flush_every_s=0.3)  # fmt: skip
    worker.start()
    try:
        completed = time.time()
        worker.submit(Pending(request_id="late", at=completed, version="1", status=504))
        reached = await asyncio.to_thread(
            store.watermarks.wait_until, SERVICE, completed + 1e-6,
            alive_since=completed - 60, timeout_s=10,
        )  # fmt: skip
        assert reached
        assert stored(store) == 1  # the mark never passes a record that is not stored yet
    finally:
        await worker.aclose()
        store.close()


async def test_an_idle_writer_keeps_its_mark_moving(tmp_path: Path) -> None:
    store = Store(tmp_path / "w.db")
    worker = RecordWorker(SERVICE, ServiceMetrics(SERVICE), store, check_sample=0.0)
    worker.start()
    try:
        later = time.time() + 0.5
        reached = await asyncio.to_thread(
            store.watermarks.wait_until, SERVICE, later, alive_since=later - 60, timeout_s=10
        )
        assert reached and stored(store) == 0
    finally:
        await worker.aclose()
        store.close()


async def test_the_mark_moves_under_steady_load(tmp_path: Path) -> None:
    """The queue is never empty after a write under load: the mark is taken when drained."""
    store = Store(tmp_path / "w.db")
    worker = RecordWorker(SERVICE, ServiceMetrics(SERVICE), store, check_sample=0.0,
                          flush_every_s=0.05)  # fmt: skip
    worker.start()
    stop = asyncio.Event()

    async def load() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            worker.submit(Pending(request_id=f"r{n}", at=time.time(), version="1", status=200))
            await asyncio.sleep(0.002)

    feeding = asyncio.create_task(load())
    try:
        target = time.time() + 0.3
        started = time.monotonic()
        reached = await asyncio.to_thread(
            store.watermarks.wait_until, SERVICE, target, alive_since=target - 60, timeout_s=5
        )
        assert reached and not feeding.done()  # passed while the load was still running
        assert time.monotonic() - started < 5
    finally:
        stop.set()
        await feeding
        await worker.aclose()
        store.close()
