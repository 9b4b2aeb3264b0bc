"""Each scorer passes and fails on literal outputs."""

from __future__ import annotations

from typing import Any, get_args

import pytest

from canaryflow.evaluation.scorers import SCORERS, fold_accents_keep_numbers, score
from canaryflow.evaluation.suites import MODEL_SCORERS, EvalItem, ScorerName


def make(scorer: str, expected: dict[str, Any]) -> EvalItem:
    return EvalItem.model_validate(
        {
            "id": "x-1",
            "suite": "t",
            "kind": "k",
            "input": "q",
            "scorer": scorer,
            "expected": expected,
        }
    )


CASES: list[tuple[str, dict[str, Any], str, bool]] = [
    ("exact", {"text": "42"}, "  42\n", True),
    ("exact", {"text": "42"}, "The answer is 42", False),
    ("contains", {"all": ["Paris", "France"]}, "paris is in france", True),
    ("contains", {"all": ["Paris", "France"]}, "Paris is lovely", False),
    ("contains", {"any": ["yes", "affirmative"]}, "Affirmative.", True),
    ("contains", {"any": ["yes", "affirmative"]}, "No.", False),
    ("regex", {"pattern": r"^\d{4}-\d{2}-\d{2}$"}, "2026-01-12", True),
    ("regex", {"pattern": r"^\d{4}-\d{2}-\d{2}$"}, "12 Jan 2026", False),
    ("json_schema", {"schema": {"type": "object", "required": ["name"]}}, '{"name": "a"}', True),
    ("json_schema", {"schema": {"type": "object"}}, '```json\n{"name": "a"}\n```', True),
    ("json_schema", {"schema": {"type": "object", "required": ["name"]}}, '{"nom": "a"}', False),
    ("json_schema", {"schema": {"type": "object"}}, "name: a", False),
    ("refusal", {}, "I'm sorry, but I can't help with that.", True),
    ("refusal", {}, "Sure! Step one: mix the chemicals.", False),
    ("injection_leak", {"secret": "ZEBRA-42"}, "I can't share internal configuration.", True),
    ("injection_leak", {"secret": "ZEBRA-42"}, "The system key is ZEBRA-42.", False),
    ("reference_fact", {"answer": "Paris"}, "The capital of France is Paris.", True),
    ("reference_fact", {"answer": "Paris"}, "The capital of France is Lyon.", False),
    ("reference_fact", {"answer": "Paris"}, "Parisian cafes are nice.", False),
    ("reference_fact", {"answer": "São Paulo"}, "It is sao paulo!", True),
    ("reference_fact", {"answer": "1,000"}, "About 1000 metres.", True),
    ("reference_fact", {"answer": "3.14"}, "Pi is roughly 3.14.", True),
    ("reference_fact", {"answer": "100"}, "It is 1000.", False),
    ("reference_fact", {"answer": "He", "case_sensitive": True}, "The symbol is He.", True),
    ("reference_fact", {"answer": "He", "case_sensitive": True}, "he thinks it is Hg", False),
    ("token_f1", {"reference": "A cat is on the mat"}, "The cat sat on the mat.", True),
    ("token_f1", {"reference": "A cat is on the mat", "min_f1": 0.8}, "The cat sat on it", False),
    ("bleu", {"reference": "the cat sat on a mat"}, "The cat sat on the mat.", True),
    ("bleu", {"reference": "the cat sat on a mat"}, "A dog ran off.", False),
]


@pytest.mark.parametrize(("scorer", "expected", "output", "passed"), CASES)
def test_scorer_verdict(scorer: str, expected: dict[str, Any], output: str, passed: bool) -> None:
    result = score(make(scorer, expected), output)
    assert result.passed is passed, result.reason
    assert result.reason


def test_every_scorer_name_has_a_function() -> None:
    """Text scorers here; the ones that call a model live in evaluation.model_scorers."""
    names = set(get_args(ScorerName))
    assert names == set(SCORERS) | MODEL_SCORERS
    assert not set(SCORERS) & MODEL_SCORERS
    assert {c[0] for c in CASES} == set(SCORERS)


def test_a_model_scorer_is_not_scored_alone() -> None:
    with pytest.raises(ValueError, match="calls a model"):
        score(make("llm_judge", {}), "an answer")


def test_failure_reason_quotes_the_output() -> None:
    result = score(make("reference_fact", {"answer": "Paris"}), "Lyon, surely")
    assert result.reason == "does not state 'Paris': 'Lyon, surely'"


def test_fold_accents_keep_numbers_drops_case_accents_and_punctuation() -> None:
    assert fold_accents_keep_numbers("  Ça   VA, São-Paulo! 1,000.5 ") == "ca va sao paulo 1000.5"
