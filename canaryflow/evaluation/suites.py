"""Evaluation suites: JSONL files of items, validated line by line, and stratified samples.

A bare name (`golden`) means the suite packaged in `canaryflow/data/suites/`; anything else is a
path. CI runs a stratified sample; the nightly run takes the whole suite.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from canaryflow.errors import ConfigError

SUITES_DIR = Path(__file__).resolve().parent.parent / "data" / "suites"

ScorerName = Literal[
    "exact",
    "contains",
    "regex",
    "json_schema",
    "refusal",
    "injection_leak",
    "reference_fact",
    "token_f1",
    "bleu",
    "semantic_similarity",
    "llm_judge",
]
# Scorers that call a model (`evaluation.model_scorers`): a run with such items needs their
# models configured, and checks that before any call.
MODEL_SCORERS = frozenset({"semantic_similarity", "llm_judge"})

# What each scorer needs in `expected`; checked at load time so a typo fails before any call.
REQUIRED_EXPECTED: dict[str, tuple[str, ...]] = {
    "exact": ("text",),
    "regex": ("pattern",),
    "json_schema": ("schema",),
    "injection_leak": ("secret",),
    "reference_fact": ("answer",),
    "token_f1": ("reference",),
    "bleu": ("reference",),
    "semantic_similarity": ("reference",),
}
# The optional pass threshold of each graded scorer, a number within [0, 1].
THRESHOLDS: dict[str, str] = {
    "token_f1": "min_f1",
    "bleu": "min_bleu",
    "semantic_similarity": "min_similarity",
}


class EvalItem(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    suite: str = Field(min_length=1)
    kind: str = Field(min_length=1)
    input: str
    scorer: ScorerName
    expected: dict[str, Any] = Field(default_factory=dict)
    tags: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _expected_fits_scorer(self) -> EvalItem:
        missing = [k for k in REQUIRED_EXPECTED.get(self.scorer, ()) if k not in self.expected]
        if missing:
            raise ValueError(f"scorer {self.scorer!r} needs expected.{missing[0]}")
        if self.scorer == "contains":
            given = [k for k in ("all", "any") if isinstance(self.expected.get(k), list)]
            if len(given) != 1:
                raise ValueError(
                    "scorer 'contains' needs exactly one of expected.all / expected.any"
                )
        if self.scorer == "regex":
            try:
                re.compile(self.expected["pattern"])
            except (re.error, TypeError) as exc:
                raise ValueError(f"expected.pattern is not a valid regex: {exc}") from None
        if "reference" in REQUIRED_EXPECTED.get(self.scorer, ()):
            reference = self.expected["reference"]
            if not isinstance(reference, str) or not reference.strip():
                raise ValueError("expected.reference must be a non-empty string")
        field = THRESHOLDS.get(self.scorer)
        if field is not None and field in self.expected:
            value = self.expected[field]
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
                raise ValueError(f"expected.{field} must be a number within [0, 1]")
        return self


class Suite(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    path: Path
    items: tuple[EvalItem, ...]

    def __len__(self) -> int:
        return len(self.items)


def available_suites() -> list[str]:
    return sorted(p.stem for p in SUITES_DIR.glob("*.jsonl"))


def _resolve(name_or_path: str | Path) -> Path:
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or "/" in text or text.endswith(".jsonl"):
        path = Path(name_or_path)
        if not path.is_file():
            raise ConfigError(f"suite file {path} does not exist")
        return path
    path = SUITES_DIR / f"{text}.jsonl"
    if not path.is_file():
        known = ", ".join(available_suites()) or "none"
        raise ConfigError(
            f"no packaged suite named {text!r} (packaged: {known}); pass a path to a .jsonl file "
            "to use your own"
        )
    return path


def load_suite(name_or_path: str | Path) -> Suite:
    path = _resolve(name_or_path)
    items: list[EvalItem] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); "
                "each line must be one JSON object"
            ) from None
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(data).__name__}")
        try:
            item = EvalItem.model_validate(data)
        except ValidationError as exc:
            problem = exc.errors()[0]
            field = ".".join(str(p) for p in problem["loc"]) or "(item)"
            raise ConfigError(
                f"{where}: field {field}: {problem['msg']}"
                + (
                    f" ({exc.error_count() - 1} more problem(s) on this line)"
                    if exc.error_count() > 1
                    else ""
                )
            ) from None
        if item.id in first_line:
            raise ConfigError(
                f"{where}: duplicate id {item.id!r} (first used on line {first_line[item.id]}); "
                "ids must be unique within a suite"
            )
        first_line[item.id] = number
        items.append(item)
    if not items:
        raise ConfigError(f"{path}: the suite has no items")
    return Suite(name=path.stem, path=path, items=tuple(items))


def stratified_sample(items: Sequence[EvalItem], n: int, seed: int) -> list[EvalItem]:
    """n items, each kind in proportion to its size and at least one of every kind.

    Deterministic for a given seed; items keep their order in the suite.
    """
    if n >= len(items):
        return list(items)
    by_kind: dict[str, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        by_kind[item.kind].append(index)
    if n < len(by_kind):
        raise ConfigError(
            f"a sample of {n} cannot hold one item of each of the {len(by_kind)} kinds "
            f"({', '.join(sorted(by_kind))}); sample at least {len(by_kind)}"
        )
    quotas = _allocate(n, {kind: len(idx) for kind, idx in by_kind.items()})
    chosen: list[int] = []
    for kind in sorted(by_kind):
        rng = random.Random(f"{seed}:{kind}")
        chosen += rng.sample(by_kind[kind], quotas[kind])
    return [items[i] for i in sorted(chosen)]


def _allocate(n: int, sizes: dict[str, int]) -> dict[str, int]:
    """Largest-remainder apportionment with a floor of one per kind."""
    total = sum(sizes.values())
    exact = {k: n * s / total for k, s in sizes.items()}
    quotas = {k: min(sizes[k], max(1, math.floor(v))) for k, v in exact.items()}
    by_remainder = sorted(sizes, key=lambda k: (-(exact[k] - math.floor(exact[k])), k))
    while sum(quotas.values()) < n:
        for kind in by_remainder:
            if sum(quotas.values()) < n and quotas[kind] < sizes[kind]:
                quotas[kind] += 1
    while sum(quotas.values()) > n:  # the floor of one pushed us over: take from the largest
        kind = max((k for k in quotas if quotas[k] > 1), key=lambda k: (quotas[k], k))
        quotas[kind] -= 1
    return quotas
