"""The judge service's bookkeeping, on a fixed clock: untrusted queries, windows that never
overlap for one rollout, bounded memory and reads, and no Prefect in the service's process."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from canaryflow.analysis.gates import GateMemory
from canaryflow.app.verdicts import (
    BadQuery,
    Entry,
    MemoryBook,
    VerdictJudge,
    VerdictQuery,
    parse_query,
)
from canaryflow.contracts import GatePolicy, RequestRecord, Role
from canaryflow.dataplane.store import Store

ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def records(
    version: str, role: Role, start: datetime, seconds: int, per_s: int
) -> list[RequestRecord]:
    return [
        RequestRecord(
            request_id=f"{version}-{role.value}-{i}",
            at=start + timedelta(seconds=i / per_s),
            service="svc",
            version=version,
            role=role,
            status=200,
            latency_ms=50.0 + (i % 7),
            checked=True,
            hallucination=False,
            unsafe=False,
        )
        for i in range(seconds * per_s)
    ]


def query(window_s: int = 60) -> VerdictQuery:
    return VerdictQuery(service="svc", stable="1", canary="2", window_s=window_s)


def test_queries_are_parsed_and_bounded() -> None:
    q = parse_query({"service": "svc", "stable": "1", "canary": "2", "window": "5m", "strict": "1"})
    assert (q.window_s, q.strict, q.role) == (300, True, Role.CANARY)
    assert parse_query({"service": "s", "stable": "1", "canary": "2"}).window_s == 60
    assert parse_query({"service": "s", "stable": "1", "canary": "2", "window": "24h"}).window_s
    for bad in ({"window": "4s"}, {"window": "86401"}, {"window": "-5s"}, {"strict": "yes"},
                {"run": "a b"}, {"stable": ""}, {"canary": 2}):  # fmt: skip
        with pytest.raises(BadQuery):
            parse_query({"service": "s", "stable": "1", "canary": "2", **bad})


def test_windows_of_one_rollout_never_overlap(tmp_path: Path) -> None:
    clock = Clock(T0)
    with Store(tmp_path / "records.db") as store:
        store.write(records("1", Role.STABLE, T0 - timedelta(seconds=120), 120, 5))
        store.write(records("2", Role.CANARY, T0 - timedelta(seconds=120), 120, 5))
        judge = VerdictJudge(store, GatePolicy(), clock=clock)
        first = judge.judge(query())
        assert first["counts"]["requests"] == {"stable": 300, "canary": 300}
        clock.now = T0 + timedelta(seconds=30)  # called again before a whole window passed
        second = judge.judge(query())
        assert second["window"]["start"] == first["window"]["end"]
        assert second["window"]["seconds"] == 30 and second["window"]["number"] == 2
        assert second["counts"]["requests"] == {"stable": 0, "canary": 0}
        assert second["decision"] == "inconclusive"
        clock.now += timedelta(seconds=2)  # too soon for a new window: the last answer again
        assert judge.judge(query())["repeated"] is True
        # another rollout (another canary) has windows of its own
        other = judge.judge(VerdictQuery(service="svc", stable="1", canary="9", window_s=60))
        assert other["window"]["seconds"] == 60


def test_a_busy_window_is_shortened_to_the_record_bound(tmp_path: Path) -> None:
    with Store(tmp_path / "records.db") as store:
        store.write(records("1", Role.STABLE, T0 - timedelta(seconds=60), 60, 20))
        store.write(records("2", Role.CANARY, T0 - timedelta(seconds=60), 60, 20))
        judge = VerdictJudge(store, GatePolicy(), clock=Clock(T0), max_records=300)
        answer = judge.judge(query())
    counts = answer["counts"]["requests"]
    assert 0 < max(counts.values()) <= 300
    assert answer["window"]["seconds"] < 60 and answer["window"]["requested_seconds"] == 60


def test_the_memory_book_forgets_after_its_ttl_and_beyond_its_size() -> None:
    now = [0.0]
    book = MemoryBook(ttl_s=100.0, max_keys=2, clock=lambda: now[0])

    def entry() -> Entry:
        return Entry(GateMemory(), T0, {}, 1, 0.0)

    for name in ("a", "b", "c"):
        book.put((name, "1", "2", ""), entry())
    assert len(book) == 2 and book.get(("a", "1", "2", "")) is None
    now[0] = 101.0
    assert book.get(("c", "1", "2", "")) is None and len(book) == 0


def test_the_service_loads_neither_prefect_nor_mlflow() -> None:
    script = (
        "import sys\n"
        "from canaryflow.app.judge_service import judge_app\n"
        "from canaryflow.app.judge_cli import build_parser\n"
        "print(sorted(m for m in ('prefect', 'mlflow') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert result.stdout.strip() == "[]", result.stdout
