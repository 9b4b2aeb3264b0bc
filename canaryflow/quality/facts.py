"""A fact database as a live checker: the knowledge-base check, on the user's own facts.

Why: a service that answers questions about its own domain (prices, policies, product names)
knows the right answers better than any judge. A facts file lists them:

    facts:
      - questions: ["What is the refund window?", "How long do I have to return an item?"]
        answers: ["30 days", "thirty days"]
        wrong_answers: ["14 days"]          # optional: stating one is a hallucination too

JSON of the same shape works too, and so does the built-in knowledge base's own format
(`data/knowledge.json`: the demo's facts file, named `demo`). A question is found inside any
prompt as a run of words within one clause, whatever the case and punctuation (the knowledge
base's lookup: dict probes, linear in the prompt). An answer is correct when it states one of the
accepted answers and none of the wrong ones; a refusal is not a hallucination.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from canaryflow.contracts import FactDatabaseChecker
from canaryflow.errors import ConfigError
from canaryflow.quality.knowledge import (
    DATA_PATH,
    Fact,
    KnowledgeBase,
    is_refusal,
    words_without_punctuation,
)
from canaryflow.quality.verdicts import CheckItem, Outcome, Verdict, bounded

FLAG = "hallucination"
_SHAPE = "facts: [{questions: [...], answers: [...], wrong_answers: [...]}]"


@dataclass(frozen=True, slots=True)
class FactAnswers:
    accepted: tuple[str, ...]
    wrong: tuple[str, ...]
    case_sensitive: bool = False


class FactDatabase:
    """Questions (many phrasings each) -> accepted answers, found inside any prompt."""

    def __init__(
        self,
        index: KnowledgeBase,
        answers: Mapping[str, FactAnswers],
        groups: Mapping[str, str] | None = None,
    ) -> None:
        """`index` finds a question, `groups` maps its fact id to its answers' key (default:
        the same id)."""
        self._index, self._answers = index, dict(answers)
        self._groups = dict(groups or {})

    def __len__(self) -> int:
        return len(self._answers)

    @classmethod
    def load(cls, path: str | Path) -> FactDatabase:
        """A facts file (YAML or JSON); `demo` is the built-in knowledge base."""
        if str(path) == "demo":
            return cls.from_knowledge(KnowledgeBase.load())
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"facts file {path} is unreadable ({exc.strerror})") from None
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError):
            raise ConfigError(f"facts file {path} is not valid YAML or JSON: {_SHAPE}") from None
        if path.resolve() == DATA_PATH:
            return cls.from_knowledge(KnowledgeBase.load())
        return cls.from_data(data, str(path))

    @classmethod
    def from_knowledge(cls, kb: KnowledgeBase) -> FactDatabase:
        answers = {
            fact.id: FactAnswers((fact.answer,), fact.wrong_answers, fact.case_sensitive)
            for fact in kb
        }
        return cls(kb, answers)

    @classmethod
    def from_data(cls, data: Any, source: str = "facts file") -> FactDatabase:
        if not isinstance(data, dict) or not isinstance(data.get("facts"), list):
            raise ConfigError(f"{source}: expected {_SHAPE}")
        rows = data["facts"]
        if rows and isinstance(rows[0], dict) and "statement" in rows[0]:
            return cls.from_knowledge(KnowledgeBase.from_json(json.dumps(data), source))
        facts: list[Fact] = []
        answers: dict[str, FactAnswers] = {}
        groups: dict[str, str] = {}
        for n, row in enumerate(rows):
            where = f"{source}: facts[{n}]"
            if not isinstance(row, dict):
                raise ConfigError(f"{where}: expected an object with questions and answers")
            questions = _strings(row, "questions", "question", where)
            accepted = _strings(row, "answers", "answer", where)
            wrong = tuple(_strings(row, "wrong_answers", None, where, required=False))
            unknown = set(row) - {
                "questions", "question", "answers", "answer", "wrong_answers", "case_sensitive"
            }  # fmt: skip
            if unknown:
                raise ConfigError(f"{where}: unknown fields {sorted(unknown)}; expected {_SHAPE}")
            case_sensitive = bool(row.get("case_sensitive", False))
            answers[f"fact-{n}"] = FactAnswers(tuple(accepted), wrong, case_sensitive)
            for i, question in enumerate(questions):
                groups[f"fact-{n}-{i}"] = f"fact-{n}"
                facts.append(
                    Fact(
                        id=f"fact-{n}-{i}",
                        category="facts",
                        question=question,
                        answer=accepted[0],
                        wrong_answers=wrong,
                        statement="{answer}",
                        case_sensitive=case_sensitive,
                    )
                )
        if not facts:
            raise ConfigError(f"{source}: no facts; expected {_SHAPE}")
        try:
            index = KnowledgeBase(tuple(facts))
        except ConfigError as exc:
            raise ConfigError(f"{source}: a question is listed twice ({exc})") from None
        return cls(index, answers, groups)

    def check(self, prompt: str, output: str) -> bool | None:
        """True: hallucinated; False: answered right (or declined); None: no known question."""
        fact = self._index.lookup(bounded(prompt))
        if fact is None:
            return None
        answers = self._answers[self._groups.get(fact.id, fact.id)]
        said = f" {words_without_punctuation(bounded(output), answers.case_sensitive)} "

        def states(value: str) -> bool:
            return f" {words_without_punctuation(value, answers.case_sensitive)} " in said

        if any(states(value) for value in answers.wrong):
            return True
        if any(states(value) for value in answers.accepted):
            return False
        return not is_refusal(output)


def _strings(
    row: Mapping[str, Any], plural: str, singular: str | None, where: str, required: bool = True
) -> list[str]:
    value = row.get(plural, row.get(singular) if singular else None)
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        value = [value]
    if value is None and not required:
        return []
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(v, str | int | float) for v in value)
    ):
        raise ConfigError(f"{where}: {plural} must be a non-empty list of text; expected {_SHAPE}")
    return [str(v) for v in value]


class FactDatabaseCheck:
    """The `fact_database` checker: local, cheap, no I/O after the file is read."""

    def __init__(self, config: FactDatabaseChecker, database: FactDatabase | None = None) -> None:
        self.config = config
        self.database = database or FactDatabase.load(config.facts_file)

    @property
    def name(self) -> str:
        return self.config.label

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def check(self, item: CheckItem) -> Sequence[Verdict]:
        found = self.database.check(item.question, item.answer)
        outcome = {None: Outcome.NOT_APPLICABLE, True: Outcome.FLAGGED, False: Outcome.PASSED}
        label = {None: "no known question", True: "hallucinated", False: "correct"}
        return (Verdict(self.name, FLAG, outcome[found], label=label[found]),)
