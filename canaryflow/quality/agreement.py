"""How far to trust a judge: its flags against human labels, with intervals.

Why: a live gate on "hallucination rate as the judge sees it" is only as good as the judge. On a
labelled set (`data/judge_labels.jsonl`: grounded, hallucinated and unsafe answers with their
context) each flag gets its confusion matrix, precision and recall with Wilson intervals, and
Cohen's kappa (agreement beyond chance) with a bootstrap interval (fixed seed: the same verdicts
give the same table). UNCHECKED verdicts are left out of the statistics and counted: a judge that
often fails to answer has an agreement table that says so.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from canaryflow.errors import ConfigError
from canaryflow.quality.verdicts import CheckItem, Outcome, Verdict
from canaryflow.stats.proportions import wilson_interval

LABELS = ("grounded", "hallucinated", "unsafe")
# The flag each positive label stands for; every other label is a negative for that flag.
FLAG_OF_LABEL = {"hallucinated": "hallucination", "unsafe": "unsafe"}
BOOTSTRAP_SEED = 20_240_610
BOOTSTRAP_RESAMPLES = 4000


@dataclass(frozen=True, slots=True)
class LabelledItem:
    id: str
    label: str
    question: str
    answer: str
    context: str | None = None

    def item(self) -> CheckItem:
        return CheckItem(self.id, self.question, self.answer, self.context)


def load_labels(path: Path) -> list[LabelledItem]:
    """JSON lines of {id, label, question, answer, context}; every bad line named."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"labels file {path} is unreadable ({exc.strerror})") from None
    items: list[LabelledItem] = []
    seen: set[str] = set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
            item = LabelledItem(
                id=str(row["id"]),
                label=row["label"],
                question=row["question"],
                answer=row["answer"],
                context=row.get("context"),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"{where}: expected a JSON object with id, label, question, answer (and "
                f"optionally context): {exc!r}"
            ) from None
        if item.label not in LABELS:
            raise ConfigError(f"{where}: label {item.label!r} is not one of {', '.join(LABELS)}")
        if not all(isinstance(t, str) for t in (item.question, item.answer)):
            raise ConfigError(f"{where}: question and answer must be text")
        if item.id in seen:
            raise ConfigError(f"{where}: id {item.id!r} is used twice: make ids unique")
        seen.add(item.id)
        items.append(item)
    if not items:
        raise ConfigError(f"labels file {path} holds no items")
    return items


def cohen_kappa(tp: int, fp: int, fn: int, tn: int) -> float:
    """(observed agreement - chance agreement) / (1 - chance agreement); NaN when chance
    agreement is 1 (both raters said the same thing of every item)."""
    n = tp + fp + fn + tn
    if n == 0:
        return math.nan
    observed = (tp + tn) / n
    chance = ((tp + fp) * (tp + fn) + (fn + tn) * (fp + tn)) / (n * n)
    return math.nan if chance >= 1 else (observed - chance) / (1 - chance)


def kappa_interval(
    tp: int,
    fp: int,
    fn: int,
    tn: int,
    confidence: float = 0.95,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float]:
    """Percentile bootstrap over items (the four cells redrawn as a multinomial); resamples
    whose kappa is undefined are left out. (NaN, NaN) with no items."""
    n = tp + fp + fn + tn
    if n == 0:
        return (math.nan, math.nan)
    cells = np.random.default_rng(seed).multinomial(n, np.array([tp, fp, fn, tn]) / n, resamples)
    a, b, c, d = (cells[:, i].astype(np.float64) for i in range(4))
    observed = (a + d) / n
    chance = ((a + b) * (a + c) + (c + d) * (b + d)) / (n * n)
    with np.errstate(divide="ignore", invalid="ignore"):
        kappas = (observed - chance) / (1 - chance)
    kappas = kappas[np.isfinite(kappas)]
    if kappas.size == 0:
        return (math.nan, math.nan)
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(kappas, [tail, 100 - tail])
    return (float(lo), float(hi))


@dataclass(frozen=True, slots=True)
class Estimate:
    value: float
    low: float
    high: float


@dataclass(frozen=True, slots=True)
class Agreement:
    """One flag: the judge against the labels."""

    flag: str
    n: int  # items with a verdict (unchecked left out)
    unchecked: int
    tp: int
    fp: int
    fn: int
    tn: int
    precision: Estimate
    recall: Estimate
    kappa: Estimate

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _proportion(k: int, n: int) -> Estimate:
    low, high = wilson_interval(k, n)
    return Estimate(k / n if n else math.nan, low, high)


def agreement(flag: str, truths: Sequence[bool], judged: Sequence[bool | None]) -> Agreement:
    """`judged[i]`: the judge raised the flag (True), did not (False), could not tell (None)."""
    if len(truths) != len(judged):
        raise ValueError("truths and judged verdicts must pair up")
    pairs = [(t, j) for t, j in zip(truths, judged, strict=True) if j is not None]
    tp = sum(t and j for t, j in pairs)
    fp = sum(j and not t for t, j in pairs)
    fn = sum(t and not j for t, j in pairs)
    tn = sum(not t and not j for t, j in pairs)
    kappa = cohen_kappa(tp, fp, fn, tn)
    low, high = kappa_interval(tp, fp, fn, tn)
    return Agreement(
        flag,
        len(pairs),
        len(truths) - len(pairs),
        tp,
        fp,
        fn,
        tn,
        precision=_proportion(tp, tp + fp),
        recall=_proportion(tp, tp + fn),
        kappa=Estimate(kappa, low, high),
    )


def flag_value(verdict: Verdict) -> bool | None:
    """For agreement, "does not apply" is "not flagged"; only UNCHECKED is no answer."""
    if verdict.outcome is Outcome.UNCHECKED:
        return None
    return verdict.outcome is Outcome.FLAGGED


def agreement_table(
    items: Sequence[LabelledItem], verdicts: Sequence[Mapping[str, Verdict]]
) -> list[Agreement]:
    """One row per flag the labels and the judge share; `verdicts[i]` maps flag -> verdict."""
    flags = sorted({flag for row in verdicts for flag in row} & set(FLAG_OF_LABEL.values()))
    table = []
    for flag in flags:
        truths = [FLAG_OF_LABEL.get(item.label) == flag for item in items]
        judged = [flag_value(row[flag]) if flag in row else None for row in verdicts]
        table.append(agreement(flag, truths, judged))
    return table


async def judge_all(
    checker: Any, items: Sequence[LabelledItem], concurrency: int = 16
) -> list[dict[str, Verdict]]:
    """Every item through `checker` (an `LlmJudge`), `concurrency` at a time, in order."""
    limit = asyncio.Semaphore(concurrency)

    async def one(item: LabelledItem) -> dict[str, Verdict]:
        async with limit:
            return {v.flag: v for v in await checker.check(item.item())}

    await checker.start()
    try:
        return list(await asyncio.gather(*(one(item) for item in items)))
    finally:
        await checker.aclose()
