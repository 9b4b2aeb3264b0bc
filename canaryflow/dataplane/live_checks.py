"""The record worker's live checks: hand answers to the checker pipeline, hold their records until
the verdicts are in, and fold the verdicts into the record's flags.

Why hold: a record is written once, with its verdicts, so a window's reader sees a request's
flags with the request. A held record has not reached the store, so the worker's watermark must
not pass it (`oldest_at`): a window is read only once its held records are written. Holding is
bounded: a record is written when all the checkers that took it have answered, or when the
longest checker timeout and `HOLD_SLACK_S` have passed; a checker with no answer by then counts
as failed ("unchecked"), never as passed. An item a checker's full queue refused is counted
(`dropped`) and its record is written at once, unchecked. The user's request never waits for any
of this: it was answered before the record reached the worker, and the checkers run in a process
of their own (`quality.remote`), so their CPU is not spent between users' requests.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from canaryflow.contracts import CheckerConfig, ProvidersFile
from canaryflow.quality.pipeline import CheckerPipeline, build_checkers
from canaryflow.quality.remote import RemoteCheckers
from canaryflow.quality.verdicts import CheckItem, CheckResult, Outcome

HOLD_SLACK_S = 1.0
# Verdict flag -> the record's column: the judge's and moderation's unsafe and a banned pattern
# all mean an unsafe answer; a leaked secret is the injection leak. `irrelevant` has no column.
FLAG_COLUMNS = {
    "hallucination": "hallucination",
    "unsafe": "unsafe",
    "banned": "unsafe",
    "secret_leak": "injection_leak",
    "refusal": "refusal",
}
COLUMNS = ("hallucination", "unsafe", "injection_leak", "refusal")
JUDGED, FAILED, DROPPED = "judged", "failed", "dropped"
MAX_REASON_CHARS = 120
_UNSAFE_TEXT = re.compile(r"[;()=\s]+")


class Checkable(Protocol):
    """What a pending record offers the checks (`recording.Pending`)."""

    request_id: str
    at: float
    version: str
    response: str
    body: Mapping[str, Any] | None


class Metrics(Protocol):
    def observe_checker(self, checker: str, outcome: str) -> None: ...


def checker_label(config: CheckerConfig) -> str:
    """How a checker is named in a record's `checks` and in the gates' evidence: its name, then
    its model and rubric version where it has them."""
    model = getattr(config, "model", None) or getattr(config, "provider", None)
    version = getattr(config, "rubric_version", None)
    label = "/".join(part for part in (config.label, model, version) if part)
    return label.replace(";", ",").replace("(", "[").replace(")", "]")


def _reason(text: str) -> str:
    return _UNSAFE_TEXT.sub(" ", text).strip()[:MAX_REASON_CHARS]


@dataclass(frozen=True, slots=True)
class Summary:
    """What the verdicts say for one record."""

    checked: bool
    unchecked: bool
    flags: dict[str, bool | None]
    checks: str


def summarize(
    labels: Mapping[str, str],
    taken: Sequence[str],
    results: Mapping[str, CheckResult],
    dropped: Sequence[str] = (),
    missing_reason: str = "no result in time",
) -> Summary:
    """Combine one record's results: a flag is True when any checker raised it, else False when
    any checked it, else None; `checked` when a checker was sampled and none failed."""
    flags: dict[str, bool | None] = dict.fromkeys(COLUMNS)
    entries = []
    failed = bool(dropped)
    for name in taken:
        result = results.get(name)
        if result is None:
            failed = True
            entries.append(f"{labels[name]}={FAILED}({_reason(missing_reason)})")
            continue
        for verdict in result.verdicts:
            column = FLAG_COLUMNS.get(verdict.flag)
            raised = verdict.raised
            if column is not None and raised is not None and flags[column] is not True:
                flags[column] = raised
        if result.unchecked:
            failed = True
            why = next(v.reason for v in result.verdicts if v.outcome is Outcome.UNCHECKED)
            entries.append(f"{labels[name]}={FAILED}({_reason(why)})")
        else:
            entries.append(f"{labels[name]}={JUDGED}")
    entries.extend(f"{labels[name]}={DROPPED}" for name in dropped)
    return Summary(bool(taken) and not failed, failed, flags, ";".join(entries))


@dataclass(slots=True)
class _Held:
    record: Any
    taken: list[str]
    dropped: list[str]
    deadline: float
    results: dict[str, CheckResult] = field(default_factory=dict)


class LiveChecks:
    """The checker pipeline of one model service, and the records it holds."""

    def __init__(
        self,
        configs: Sequence[CheckerConfig],
        providers: ProvidersFile | None,
        metrics: Metrics,
        *,
        queue_size: int = 1000,
        source: str = "providers",
        in_process: bool = False,
    ) -> None:
        self.pipeline: CheckerPipeline | RemoteCheckers
        if in_process:  # on the caller's loop: 4 workers, each ~1 ms of CPU per call
            checkers = build_checkers(configs, providers, source=source)
            self.pipeline = CheckerPipeline(
                checkers, self._on_result, queue_size=queue_size, workers=4
            )
        else:
            self.pipeline = RemoteCheckers(
                configs, providers, self._on_result, queue_size=queue_size, source=source
            )
        self.labels = {name: checker_label(c) for name, c in self.pipeline.configs.items()}
        self.metrics = metrics
        self.hold_s = self.pipeline.longest_timeout_s + HOLD_SLACK_S
        self._held: dict[int, _Held] = {}  # id(CheckItem) -> its record; the item is kept alive
        self._items: dict[int, CheckItem] = {}
        self._ready: list[Any] = []
        self.dropped = 0
        self.late = 0

    async def start(self) -> None:
        await self.pipeline.start()

    async def aclose(self) -> None:
        await self.pipeline.aclose()

    @property
    def holding(self) -> int:
        return len(self._held)

    def submit(self, record: Checkable, role: str) -> bool:
        """Offer an answered record to the checkers: True when held (its verdicts pending),
        False when it is to be written now (no checker took it; a dropped one is noted on it)."""
        item = CheckItem.from_request(
            record.request_id, record.body or {}, record.response, version=record.version, role=role
        )
        counters = self.pipeline.counters
        before = {name: c.dropped for name, c in counters.items()}
        taken = self.pipeline.submit_to(item)
        dropped = [name for name, c in counters.items() if c.dropped > before[name]]
        for name in dropped:
            self.dropped += 1
            self.metrics.observe_checker(self.labels[name], DROPPED)
        if not taken:
            if dropped:
                self._apply(record, summarize(self.labels, (), {}, dropped))
            return False
        self._items[id(item)] = item
        self._held[id(item)] = _Held(record, taken, dropped, time.monotonic() + self.hold_s)
        return True

    def _on_result(self, result: CheckResult) -> None:
        key = id(result.item)
        held = self._held.get(key)
        if held is None or self._items.get(key) is not result.item:
            self.late += 1  # its record was written without it
            self.metrics.observe_checker(self.labels.get(result.checker, result.checker), "late")
            return
        held.results[result.checker] = result
        outcome = FAILED if result.unchecked else JUDGED
        self.metrics.observe_checker(self.labels[result.checker], outcome)
        if len(held.results) == len(held.taken):
            self._release(key, held)

    def _release(self, key: int, held: _Held) -> None:
        del self._held[key], self._items[key]
        missing = f"no result within {self.hold_s:g} s"
        self._apply(
            held.record, summarize(self.labels, held.taken, held.results, held.dropped, missing)
        )
        self._ready.append(held.record)

    def take_ready(self, now: float | None = None) -> list[Any]:
        """Records whose verdicts are all in, and those held past their deadline (the missing
        verdicts failed), oldest first."""
        now = time.monotonic() if now is None else now
        for key, held in [(k, h) for k, h in self._held.items() if h.deadline <= now]:
            for name in held.taken:
                if name not in held.results:
                    self.metrics.observe_checker(self.labels[name], FAILED)
            self._release(key, held)
        ready, self._ready = self._ready, []
        ready.sort(key=lambda record: record.at)
        return ready

    def release_all(self) -> list[Any]:
        """Everything held, now (closing): missing verdicts failed."""
        return self.take_ready(float("inf"))

    def oldest_at(self) -> float | None:
        """The completion time of the oldest record held or ready but not yet handed out: the
        watermark stays at or below it."""
        times = [h.record.at for h in self._held.values()] + [r.at for r in self._ready]
        return min(times, default=None)

    @staticmethod
    def _apply(record: Any, summary: Summary) -> None:
        record.checked = summary.checked
        record.unchecked = summary.unchecked
        record.checks = summary.checks
        for column, value in summary.flags.items():
            setattr(record, column, value)
