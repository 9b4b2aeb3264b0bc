"""What a live checker is given and what it answers: one item in, verdicts out.

A checker's answer is never just True/False: a judge that timed out, refused or wrote garbage has
not checked anything, and counting that as "passed" would let a release through on silence. So
every verdict has an `Outcome`, and UNCHECKED is its own value that the gates can count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from canaryflow.contracts import CheckerConfig

# Checked text is bounded: a checker never reads more than this of a prompt, context or answer.
MAX_TEXT_CHARS = 16_384


class Outcome(StrEnum):
    FLAGGED = "flagged"  # the flag is raised (hallucinated, unsafe, leaked a secret...)
    PASSED = "passed"  # checked, fine
    NOT_APPLICABLE = "not_applicable"  # the question does not apply (no fact was asked)
    UNCHECKED = "unchecked"  # the checker could not tell: error, timeout, refusal, garbage


@dataclass(frozen=True, slots=True)
class CheckItem:
    """One answered request. `context` is what the answer should be grounded in: the request's
    `context` field (a RAG context) or, failing that, its system messages."""

    request_id: str
    question: str
    answer: str
    context: str | None = None
    version: str = ""
    role: str = ""

    @classmethod
    def from_request(
        cls, request_id: str, body: Mapping[str, Any], answer: str, **extra: Any
    ) -> CheckItem:
        """From an OpenAI-style chat body: the last user message is the question."""
        messages = [m for m in body.get("messages") or () if isinstance(m, Mapping)]
        question = next(
            (_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), ""
        )
        context = body.get("context")
        if isinstance(context, Sequence) and not isinstance(context, str):
            context = "\n\n".join(str(part) for part in context)
        if not context:
            system = [
                _text(m.get("content"))
                for m in messages
                if m.get("role") in ("system", "developer")
            ]
            context = "\n\n".join(part for part in system if part) or None
        return cls(request_id, question, answer, context if context else None, **extra)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, Mapping))
    return ""


def bounded(text: str | None) -> str:
    """The part of `text` a checker reads (its first MAX_TEXT_CHARS characters)."""
    return (text or "")[:MAX_TEXT_CHARS]


@dataclass(frozen=True, slots=True)
class Verdict:
    """One flag's answer from one checker, with what produced it (the evidence's provenance)."""

    checker: str  # the configured name
    flag: str  # hallucination, unsafe, irrelevant, secret_leak, refusal, banned
    outcome: Outcome
    label: str = ""  # the checker's own word: grounded, hallucinated, flagged, ...
    confidence: float | None = None
    reason: str = ""
    model: str | None = None  # judge or moderation model
    rubric_version: str | None = None
    categories: tuple[str, ...] = ()
    cost_usd: float = 0.0
    latency_ms: float = 0.0

    @property
    def raised(self) -> bool | None:
        """The record's flag: True, False, or None when unchecked or not applicable."""
        if self.outcome is Outcome.FLAGGED:
            return True
        if self.outcome is Outcome.PASSED:
            return False
        return None


@dataclass(frozen=True, slots=True)
class CheckResult:
    """Everything one checker said about one item."""

    item: CheckItem
    checker: str
    kind: str
    verdicts: tuple[Verdict, ...] = field(default_factory=tuple)

    @property
    def unchecked(self) -> bool:
        return any(v.outcome is Outcome.UNCHECKED for v in self.verdicts)

    @property
    def cost_usd(self) -> float:
        return sum(v.cost_usd for v in self.verdicts)

    def flags(self) -> dict[str, bool | None]:
        """flag -> raised, one entry per verdict (the last word when a flag repeats)."""
        return {v.flag: v.raised for v in self.verdicts}


class LiveChecker(Protocol):
    """What the pipeline runs: an async check of one item; `start`/`aclose` hold connections."""

    @property
    def config(self) -> CheckerConfig: ...

    @property
    def name(self) -> str: ...

    async def start(self) -> None: ...

    async def check(self, item: CheckItem) -> Sequence[Verdict]: ...

    async def aclose(self) -> None: ...


def unchecked(checker: str, flags: Sequence[str], reason: str, **extra: Any) -> tuple[Verdict, ...]:
    """The same UNCHECKED verdict for each flag a failed call would have answered."""
    return tuple(
        Verdict(checker, flag, Outcome.UNCHECKED, reason=reason, **extra) for flag in flags
    )


def parse_checks(text: str) -> list[tuple[str, str, str]]:
    """A stored record's `checks` read back (`dataplane.live_checks.summarize` writes them:
    `label=judged;label=failed(reason);label=dropped`): (checker label, outcome, reason)."""
    found = []
    for entry in text.split(";") if text else ():
        head, _, reason = entry.partition("(")  # a label never holds "(", a reason no "="
        label, _, outcome = head.rpartition("=")
        found.append((label, outcome, reason.removesuffix(")")))
    return found
