"""Regex and keyword lists as a live checker: secrets, refusals, banned content, in linear time.

Why linear: the text is a model's answer, i.e. untrusted, and a backtracking regex over it can
take seconds (`\\w+x` on 16 KB of letters takes ~2 s in Python's `re`). So:
- the text read is bounded (`MAX_TEXT_CHARS`);
- regexes run word by word (runs of non-space), a long word in overlapping windows of
  `WINDOW` characters, so one search costs at most WINDOW² steps and the whole text
  O(n · WINDOW); patterns that nest quantifiers, use backreferences or lookarounds, or match
  whitespace are refused when the configuration is read (`contracts.checkers.regex_problem`);
- keywords are phrases matched whole-word on the text without punctuation (substring search).
A match is reported by which list and pattern matched, never by the matched text: it may be the
secret itself.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from canaryflow.contracts import PatternList, PatternsChecker
from canaryflow.quality.knowledge import words_without_punctuation
from canaryflow.quality.verdicts import CheckItem, Outcome, Verdict, bounded

WINDOW = 128  # characters of one word searched at once
STEP = WINDOW // 2  # windows overlap by half: a match up to STEP characters long is never split
FLAGS = {"secrets": "secret_leak", "refusals": "refusal", "banned": "banned"}


@dataclass(frozen=True, slots=True)
class Matcher:
    """One flag's compiled list."""

    regexes: tuple[re.Pattern[str], ...]
    keywords: tuple[str, ...]
    within_words: int | None

    @classmethod
    def of(cls, patterns: PatternList) -> Matcher:
        keywords = tuple(f" {words_without_punctuation(keyword)} " for keyword in patterns.keywords)
        regexes = tuple(re.compile(p) for p in patterns.regex)
        return cls(regexes, keywords, patterns.within_words)

    def __bool__(self) -> bool:
        return bool(self.regexes or self.keywords)

    def first_match(self, text: str) -> str | None:
        """Which pattern matched first ('regex 2', 'keyword 1'), or None."""
        text = bounded(text)
        words = text.split()
        if self.within_words is not None:
            words = words[: self.within_words]
        if self.keywords:
            spoken = f" {words_without_punctuation(' '.join(words))} "
            for n, keyword in enumerate(self.keywords, 1):
                if keyword in spoken:
                    return f"keyword {n}"
        for n, regex in enumerate(self.regexes, 1):
            if any(regex.search(piece) for piece in _pieces(words)):
                return f"regex {n}"
        return None


def _pieces(words: Sequence[str]) -> list[str]:
    """Each word, a word over WINDOW characters as windows of WINDOW stepping STEP."""
    pieces: list[str] = []
    for word in words:
        if len(word) <= WINDOW:
            pieces.append(word)
        else:
            pieces.extend(word[i : i + WINDOW] for i in range(0, len(word) - STEP, STEP))
    return pieces


class Patterns:
    """The `patterns` checker: local, no I/O; one verdict per configured list."""

    def __init__(self, config: PatternsChecker) -> None:
        self.config = config
        lists = {"secrets": config.secrets, "refusals": config.refusals, "banned": config.banned}
        self.matchers = {
            FLAGS[name]: matcher
            for name, patterns in lists.items()
            if (matcher := Matcher.of(patterns))
        }

    @property
    def name(self) -> str:
        return self.config.label

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def check(self, item: CheckItem) -> Sequence[Verdict]:
        return self.scan(item.answer)

    def scan(self, answer: str) -> tuple[Verdict, ...]:
        verdicts = []
        for flag, matcher in self.matchers.items():
            hit = matcher.first_match(answer)
            verdicts.append(
                Verdict(
                    self.name,
                    flag,
                    Outcome.FLAGGED if hit else Outcome.PASSED,
                    label="matched" if hit else "clean",
                    reason=f"{hit} of the {flag} list" if hit else "",
                )
            )
        return tuple(verdicts)
