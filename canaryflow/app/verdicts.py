"""Verdicts for callers outside canaryflow's flows: one query in, the judged window as JSON out.

The query is untrusted (it comes over HTTP, `judge_service`): every field is bounded and checked,
and an error names the field, never its value. A window is the last `window` seconds of the
request store's records of the stable and candidate versions, judged with the policy's live gates
by `judge_sample`; no records (an unknown service or version) is an inconclusive answer, never a
pass.

Sequential state: each rate gate's e-process (`GateMemory`) is kept in this process per (service,
stable, canary, role and run), with a TTL and a bound on keys. A restart or an eviction resets it,
which is conservative: evidence starts over, so a pass needs fresh samples again. One key's
windows never overlap (a window starts no earlier than the previous one's end), so no request
counts twice in the e-processes; a window whose records are not all stored yet (a record writer's
watermark lags) or too many to read is answered inconclusive and judged again, whole, next time.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from canaryflow.analysis.gates import GateMemory, judge_sample
from canaryflow.analysis.sources import StoreSource
from canaryflow.contracts import Decision, GatePolicy, GateResult, Label, Role, Severity, combine
from canaryflow.dataplane.store import Store

log = logging.getLogger("canaryflow.judge_service")

MIN_WINDOW_S = 5
MAX_WINDOW_S = 24 * 3600
DEFAULT_WINDOW = "60s"
MAX_WATERMARK_LAG_S = 10.0  # as the release flow's watermark wait: a writer this far behind
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@-]{0,127}")
WINDOW = re.compile(r"(\d{1,6})(s|m|h)?")
UNITS = {"s": 1, "m": 60, "h": 3600}
FIELDS = ("service", "stable", "canary", "window", "role", "run", "strict")
USAGE = (
    "send service, stable and canary (letters, digits and ._:/@-, at most 128 each), "
    f"optionally window ({MIN_WINDOW_S}s..24h, as 60s, 5m or 1h; default {DEFAULT_WINDOW}), "
    "role (canary or shadow), run (restarts the evidence when it changes) and strict (1: "
    "answer 412 unless the decision is pass): as query parameters, a JSON object, or Flagger's "
    "webhook payload with them in `metadata`"
)
Key = tuple[str, str, str, str]


class BadQuery(ValueError):
    """What the caller sent cannot be judged; the message says what to send instead."""


@dataclass(frozen=True)
class VerdictQuery:
    service: str
    stable: str
    canary: str
    window_s: int
    role: Role = Role.CANARY
    run: str = ""
    strict: bool = False

    @property
    def key(self) -> Key:
        return (self.service, self.stable, self.canary, f"{self.role.value}/{self.run}")


def parse_window(text: str) -> int:
    found = WINDOW.fullmatch(text.strip())
    if found is None:
        raise BadQuery(f"window must look like 60s, 5m or 1h; {USAGE}")
    seconds = int(found.group(1)) * UNITS[found.group(2) or "s"]
    if not MIN_WINDOW_S <= seconds <= MAX_WINDOW_S:
        raise BadQuery(f"window must lie in {MIN_WINDOW_S}s..24h; {USAGE}")
    return seconds


def parse_query(params: Mapping[str, Any]) -> VerdictQuery:
    """Validate untrusted fields; errors name the field, never echo its value."""
    unknown = [k for k in params if k not in FIELDS]
    if unknown:  # not named: an untrusted key is not echoed
        raise BadQuery(f"{len(unknown)} unknown field(s); {USAGE}")
    values: dict[str, str] = {}
    for field, value in params.items():
        if isinstance(value, bool | int) and field in ("strict", "window"):
            value = str(int(value)) if field == "strict" else f"{value}s"
        if not isinstance(value, str):
            raise BadQuery(f"{field} must be a string; {USAGE}")
        values[field] = value
    for field in ("service", "stable", "canary"):
        if not values.get(field):
            raise BadQuery(f"{field} is missing; {USAGE}")
    for field in ("service", "stable", "canary", "run"):
        if field in values and values[field] and NAME.fullmatch(values[field]) is None:
            raise BadQuery(f"{field} is not a valid name; {USAGE}")
    role = values.get("role", "canary")
    if role not in (Role.CANARY.value, Role.SHADOW.value):
        raise BadQuery(f"role must be canary or shadow; {USAGE}")
    strict = values.get("strict", "0").lower()
    if strict not in ("0", "1", "true", "false", ""):
        raise BadQuery(f"strict must be 1 or 0; {USAGE}")
    return VerdictQuery(
        service=values["service"],
        stable=values["stable"],
        canary=values["canary"],
        window_s=parse_window(values.get("window") or DEFAULT_WINDOW),
        role=Role(role),
        run=values.get("run", ""),
        strict=strict in ("1", "true"),
    )


@dataclass
class Entry:
    memory: GateMemory
    last_end: datetime
    answer: dict[str, Any]
    windows: int
    touched: float


class MemoryBook:
    """Each key's e-processes and last window, kept `ttl_s` after its last judgment and at most
    `max_keys` keys (the least recently judged go first): memory stays bounded."""

    def __init__(self, ttl_s: float, max_keys: int, clock: Callable[[], float] = time.monotonic):
        self.ttl_s, self.max_keys, self.clock = ttl_s, max_keys, clock
        self._entries: OrderedDict[Key, Entry] = OrderedDict()
        self._guard = threading.Lock()

    def get(self, key: Key) -> Entry | None:
        with self._guard:
            self._expire()
            return self._entries.get(key)

    def put(self, key: Key, entry: Entry) -> None:
        with self._guard:
            entry.touched = self.clock()
            self._entries[key] = entry
            self._entries.move_to_end(key)
            self._expire()
            while len(self._entries) > self.max_keys:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)

    def _expire(self) -> None:
        now = self.clock()
        while self._entries:
            key, oldest = next(iter(self._entries.items()))
            if now - oldest.touched <= self.ttl_s:
                break
            del self._entries[key]


class KeyLocks:
    """One lock per key while someone holds it: one key's windows are judged one at a time."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[Key, tuple[threading.Lock, int]] = {}

    @contextmanager
    def hold(self, key: Key) -> Iterator[None]:
        with self._guard:
            lock, users = self._locks.get(key, (threading.Lock(), 0))
            self._locks[key] = (lock, users + 1)
        with lock:
            try:
                yield
            finally:
                with self._guard:
                    users = self._locks[key][1] - 1
                    if users:
                        self._locks[key] = (lock, users)
                    else:
                        del self._locks[key]


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: such a number (no estimate) is null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _nodata(gate: str, reason: str) -> GateResult:
    return GateResult(gate=gate, severity=Severity.OBSERVABILITY, label=Label.NODATA, reason=reason)


class VerdictJudge:
    """Judges windows of one store with one policy; thread-safe."""

    def __init__(
        self,
        store: Store,
        policy: GatePolicy,
        *,
        book: MemoryBook | None = None,
        max_records: int = 50_000,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.store, self.policy, self.max_records, self.clock = store, policy, max_records, clock
        self.book = book or MemoryBook(ttl_s=6 * 3600, max_keys=1000)
        self.locks = KeyLocks()

    def judge(self, query: VerdictQuery) -> dict[str, Any]:
        with self.locks.hold(query.key):
            entry = self.book.get(query.key)
            end, lag_note = self._end(query)
            if entry is not None and (end - entry.last_end).total_seconds() < MIN_WINDOW_S:
                return {**entry.answer, "repeated": True}  # nothing new since: no new evidence
            start = end - timedelta(seconds=query.window_s)
            if entry is not None and entry.last_end > start:
                start = entry.last_end  # never judge a request twice in the e-processes
            start, counts, size_note = self._bounded(query, start, end)
            notes = [n for n in (lag_note, size_note) if n is not None]
            errors: dict[str, int] = {}
            if size_note is None:
                sample = StoreSource(self.store).window(
                    query.service, query.stable, query.canary, start, end,
                    candidate_role=query.role,
                )  # fmt: skip
                results, _, memory = judge_sample(
                    self.policy, sample, entry.memory if entry else None
                )
                counts = {"stable": sample.baseline.n, query.role.value: sample.candidate.n}
                errors = {
                    "stable": sample.baseline.errors,
                    query.role.value: sample.candidate.errors,
                }
            else:  # too many records even in a shortened window: judged without reading them
                results, memory = (), entry.memory if entry else GateMemory()
            gates = (*results, *notes)
            decision = combine(gates) if gates else Decision.INCONCLUSIVE
            if decision is Decision.PASS and not all(counts.values()):
                decision = Decision.INCONCLUSIVE  # never a pass without records of both
            windows = (entry.windows if entry else 0) + 1
            answer = self._answer(query, decision, gates, counts, errors, start, end, windows)
            if not notes:  # an incomplete window is judged again, whole, by the next call
                self.book.put(query.key, Entry(memory, end, answer, windows, 0.0))
        log.info(
            "verdict %s %s vs %s (%s): %s",
            query.service, query.stable, query.canary, query.role.value, decision.value,
        )  # fmt: skip
        return answer

    def _end(self, query: VerdictQuery) -> tuple[datetime, GateResult | None]:
        """Now, or earlier: where every live record writer's records are known to be stored."""
        now = self.clock()
        since = (now - timedelta(seconds=query.window_s)).timestamp()
        lowest = self.store.watermarks.lowest(query.service, alive_since=since)
        if lowest is None or lowest >= now.timestamp():
            return now, None
        lag = now.timestamp() - lowest
        if lag <= MAX_WATERMARK_LAG_S:
            return datetime.fromtimestamp(lowest, UTC), None
        return now, _nodata(
            "watermark",
            f"a record writer of {query.service} is {lag:.0f} s behind: the window's records are "
            "not all stored yet, judged incomplete",
        )

    def _bounded(
        self, query: VerdictQuery, start: datetime, end: datetime
    ) -> tuple[datetime, dict[str, int], GateResult | None]:
        """`start`, moved later while either version has more than `max_records` records in
        the window: a query never reads more than that many records per version."""
        for _ in range(8):
            counts = {
                "stable": self.store.count(
                    query.service, start, end, role=Role.STABLE, version=query.stable
                ),
                query.role.value: self.store.count(
                    query.service, start, end, role=query.role, version=query.canary
                ),
            }
            biggest = max(counts.values())
            if biggest <= self.max_records:
                return start, counts, None
            start = end - (end - start) * (0.9 * self.max_records / biggest)
        return (
            start,
            counts,
            _nodata(
                "query_size",
                f"more than {self.max_records} records per version even in a "
                f"{(end - start).total_seconds():.1f} s window: not read, ask for a shorter window",
            ),
        )

    def _answer(
        self,
        query: VerdictQuery,
        decision: Decision,
        gates: tuple[GateResult, ...],
        counts: dict[str, int],
        errors: dict[str, int],
        start: datetime,
        end: datetime,
        windows: int,
    ) -> dict[str, Any]:
        failed = [g.gate for g in gates if g.label in (Label.FAIL, Label.ERROR)]
        seconds = round((end - start).total_seconds(), 3)
        summary = f"{decision.value}: " + (
            "; ".join(f"{g.gate}: {g.reason}" for g in gates if g.label is not Label.PASS)
            or f"every gate passed over {seconds:g} s"
        )
        answer: dict[str, Any] = _finite(
            {
                "decision": decision.value,
                "summary": summary[:1000],
                "policy": self.policy.name,
                "service": query.service,
                "stable": query.stable,
                "canary": query.canary,
                "role": query.role.value,
                "run": query.run or None,
                "window": {
                    "start": start.isoformat(),
                    "end": end.isoformat(),
                    "seconds": seconds,
                    "requested_seconds": query.window_s,
                    "number": windows,
                },
                "counts": {"requests": counts, "errors": errors},
                "failed": failed,
                "gates": [g.model_dump(mode="json") for g in gates],
                "repeated": False,
            }
        )
        return answer
