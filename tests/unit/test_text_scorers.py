"""token_f1 and bleu against values worked out by hand, and their edge cases."""

from __future__ import annotations

import math
from typing import Any

import pytest
from pydantic import ValidationError

from canaryflow.evaluation.scorers import bleu_score, f1_tokens, score, token_f1_score
from canaryflow.evaluation.suites import EvalItem
from canaryflow.quality.verdicts import MAX_TEXT_CHARS


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


# --------------------------------------------------------------------------- token F1


@pytest.mark.parametrize(
    ("output", "reference", "f1"),
    [
        # articles and punctuation dropped: {cat, sat, on, mat} vs {cat, is, on, mat}, 3 shared
        ("The cat sat on the mat.", "A cat is on the mat", 0.75),
        # precision 1, recall 1/3: 2 * 1 * 1/3 / (4/3)
        ("Paris", "Paris is the capital", 0.5),
        # a repeated word is shared once: precision 1/3, recall 1/3
        ("paris paris paris", "paris is nice", 1 / 3),
        ("Lyon", "Paris", 0.0),
        # case folding is Unicode's: Ã -> ã, ß -> ss; the em dash is punctuation
        ("SÃO PAULO — Brasil!", "são paulo", 0.8),
        ("STRASSE", "Straße", 1.0),
        ("東京", "東京", 1.0),
    ],
)
def test_token_f1_matches_hand_computed_values(output: str, reference: str, f1: float) -> None:
    assert token_f1_score(output, reference) == pytest.approx(f1)


def test_token_f1_normalises_as_squad_does() -> None:
    assert f1_tokens("The  Cat's an (old) one, isn't it?") == ["cats", "old", "one", "isnt", "it"]


def test_token_f1_threshold_is_inclusive_and_the_reason_states_both() -> None:
    at_default = score(make("token_f1", {"reference": "Paris is the capital"}), "Paris")
    assert at_default.passed and at_default.reason == "token F1 0.500 >= 0.5"
    stricter = score(
        make("token_f1", {"reference": "Paris is the capital", "min_f1": 0.6}), "Paris"
    )
    assert not stricter.passed and stricter.reason == "token F1 0.500 < 0.6"


@pytest.mark.parametrize("output", ["", "   ", "The.", "?!"])
def test_token_f1_of_an_empty_answer_is_zero(output: str) -> None:
    assert token_f1_score(output, "Paris") == 0.0
    result = score(make("token_f1", {"reference": "Paris"}), output)
    assert not result.passed and result.reason == "token F1 0.000 < 0.5"


def test_token_f1_of_two_empty_texts_is_one() -> None:
    assert token_f1_score("the", "a.") == 1.0


def test_token_f1_reads_a_bounded_prefix_of_very_long_texts() -> None:
    reference = "alpha beta gamma delta " * 2_000  # 46,000 characters
    output = reference + "noise " * 200_000  # 1.2 million
    assert len(reference) > MAX_TEXT_CHARS
    # Read whole, the noise would sink precision; cut to the same prefix, they agree.
    assert token_f1_score(output, reference) == 1.0
    assert token_f1_score("noise " * 200_000, reference) == 0.0


# --------------------------------------------------------------------------- BLEU


@pytest.mark.parametrize(
    ("output", "reference", "value"),
    [
        # precisions 5/6, 3/5, 2/4, 1/3, no brevity penalty: (1/12) ** (1/4)
        ("the cat sat on the mat", "the cat sat on a mat", (1 / 12) ** 0.25),
        # precisions 6/7, 5/6, 4/5, 3/4 (product 3/7); longer than the reference: no penalty
        ("the cat sat on the mat today", "the cat sat on the mat", (3 / 7) ** 0.25),
        # no 3- or 4-gram: epsilon 0.1 each (method 1); brevity penalty exp(1 - 6/2)
        ("the cat", "the cat sat on the mat", math.exp(-2) * (1 * 1 * 0.1 * 0.1) ** 0.25),
        # no 4-gram matches: 0.1 / 2 for it; precisions 4/5, 2/4, 1/3
        ("the cat ran on mat", "the cat sat on the mat", None),
        ("The cat sat on the mat.", "the cat sat on the mat.", 1.0),
        ("Ça va très bien", "ça va TRÈS bien", 1.0),
        ("a dog ran off", "the cat sat on the mat", 0.0),
    ],
)
def test_bleu_matches_hand_computed_values(
    output: str, reference: str, value: float | None
) -> None:
    if value is None:  # worked out below, step by step
        p1, p2, p3, p4 = 4 / 5, 1 / 4, 0.1 / 3, 0.1 / 2
        value = math.exp(1 - 6 / 5) * (p1 * p2 * p3 * p4) ** 0.25
    assert bleu_score(output, reference) == pytest.approx(value, rel=1e-9)


def test_bleu_threshold_and_reason() -> None:
    item = make("bleu", {"reference": "the cat sat on a mat"})
    passed = score(item, "the cat sat on the mat")
    assert passed.passed and passed.reason == "BLEU 0.537 >= 0.3"
    strict = score(
        make("bleu", {"reference": "the cat sat on a mat", "min_bleu": 0.6}),
        "the cat sat on the mat",
    )
    assert not strict.passed and strict.reason == "BLEU 0.537 < 0.6"


@pytest.mark.parametrize("output", ["", "  \n ", "..."])
def test_bleu_of_an_empty_or_unrelated_answer_is_zero(output: str) -> None:
    result = score(make("bleu", {"reference": "the cat sat"}), output)
    assert bleu_score(output, "the cat sat") == 0.0
    assert not result.passed and result.reason == "BLEU 0.000 < 0.3"


def test_bleu_reads_a_bounded_prefix_of_very_long_texts() -> None:
    reference = "one two three four five " * 1_000  # 24,000 characters
    assert bleu_score(reference + "six " * 300_000, reference) == pytest.approx(1.0)


# --------------------------------------------------------------------------- suite checks


@pytest.mark.parametrize(
    ("scorer", "expected", "problem"),
    [
        ("token_f1", {}, "needs expected.reference"),
        ("bleu", {"reference": "  "}, "expected.reference must be a non-empty string"),
        ("token_f1", {"reference": "x", "min_f1": 1.5}, "expected.min_f1 must be a number"),
        ("bleu", {"reference": "x", "min_bleu": "high"}, "expected.min_bleu must be a number"),
        ("semantic_similarity", {"reference": "x", "min_similarity": True}, "min_similarity"),
    ],
)
def test_expected_fields_are_checked_at_load(
    scorer: str, expected: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ValidationError, match=problem):
        make(scorer, expected)
