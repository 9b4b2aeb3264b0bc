"""The sandbox as a checker provider: a judge model, a moderation endpoint, embeddings.

So the live checkers run their real HTTP path in tests and in the demo, the sandbox answers them
deterministically, from what the text says, never from a planted marker:

- `sandbox-judge` reads the rubric prompt (`quality.llm_judge.read_judge_prompt`) and decides:
  groundedness by reading the answer's factual claims (`KnowledgeBase.claims`) and checking each
  against the context it was given, then the knowledge base; relevance by shared content words;
  safety by whether the answer helps with a harmful request instead of declining. The verdict is
  the JSON object the rubric asks for. It also answers the offline pairwise prompt
  (`evaluation.model_scorers.pairwise_messages`): right facts first, then relevance; when
  neither answer is better it names the one shown first, the position bias real judges have
  and the scorer's swapped second asking is there to catch. Profile overrides: `garbage`
  (share of replies that are not a verdict), `error_rate`, `latency_ms`
  (e.g. `sandbox-judge@garbage=1`).
- `POST /v1/moderations`: flagged with OpenAI's category names when the text names a harmful
  topic and is not a refusal.
- `POST /v1/embeddings`: a hashed bag of words, L2-normalised (same text, same vector; shared
  words, closer vectors).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from typing import Any

from canaryflow.contracts import Rubric
from canaryflow.evaluation.model_scorers import PairwisePrompt, read_pairwise_prompt
from canaryflow.quality.knowledge import (
    KnowledgeBase,
    is_refusal,
    unsafe_topic,
    words_without_punctuation,
)
from canaryflow.quality.llm_judge import JudgePrompt, read_judge_prompt

EMBEDDING_DIMENSIONS = 256
_STOP_WORDS = (
    "a an and are as at be by can do does for from how i in is it its me my of on or please "
    "tell that the this to was what when where which who whom why will with you your"
)
_STOP = frozenset(_STOP_WORDS.split(" "))
_CATEGORIES = {
    "violence": ("bomb", "explosives", "gun", "hurt", "poison", "nerve agent"),
    "illicit/violent": ("bomb", "explosives", "gun", "nerve agent", "poison"),
    "illicit": (
        "meth", "methamphetamine", "ransomware", "malware", "virus", "keylogger", "credit card",
        "phishing", "hack", "hotwire", "launder", "counterfeit", "passport",
    ),
    "harassment": ("stalk",),
}  # fmt: skip
_GARBAGE = (
    "Looking at this answer, I would say it is mostly fine.",
    '{"verdict": "grounded"}',
    '```json\n{"verdict": "grounded", "confidence": 0.9, "reason": "fine"}\n```',
    '{"verdict": "probably", "confidence": 0.5, "reason": "unsure"}',
)


def judge_reply(
    system: str, user: str, kb: KnowledgeBase, garbage_draw: float, garbage: float
) -> str | None:
    """The judge's reply to a rubric or pairwise prompt; None when the messages are neither."""
    prompt = read_judge_prompt(system, user)
    pair = read_pairwise_prompt(system, user) if prompt is None else None
    if prompt is None and pair is None:
        return None
    if garbage_draw < garbage:
        return _GARBAGE[int(garbage_draw / garbage * len(_GARBAGE)) % len(_GARBAGE)]
    if pair is not None:
        winner, why = prefer(pair, kb)
        return json.dumps({"winner": winner, "reason": why})
    assert prompt is not None
    verdict, confidence, reason = decide(prompt, kb)
    return json.dumps({"verdict": verdict, "confidence": confidence, "reason": reason})


def decide(prompt: JudgePrompt, kb: KnowledgeBase) -> tuple[str, float, str]:
    if prompt.rubric is Rubric.SAFETY:
        return _safety(prompt)
    if prompt.rubric is Rubric.RELEVANCE:
        return _relevance(prompt, kb)
    return _groundedness(prompt, kb)


def _groundedness(prompt: JudgePrompt, kb: KnowledgeBase) -> tuple[str, float, str]:
    stated = {c.fact.id: c.value for c in kb.claims(prompt.context or "") if c.value is not None}

    def truth(fact_id: str, default: str) -> str:
        return stated.get(fact_id) or default

    claims = kb.claims(prompt.answer)
    for claim in claims:
        right = truth(claim.fact.id, claim.fact.answer)
        if not claim.agrees_with(right):
            source = "the context" if claim.fact.id in stated else "the reference facts"
            return "hallucinated", 0.9, f"says {claim.said!r} where {source} say {right!r}"
    if claims:
        return "grounded", 0.9, "every factual claim agrees with the context and references"
    fact = kb.lookup(prompt.question)
    if fact is not None and not is_refusal(prompt.answer):
        right = truth(fact.id, fact.answer)
        said = f" {words_without_punctuation(prompt.answer, fact.case_sensitive)} "
        if f" {words_without_punctuation(right, fact.case_sensitive)} " in said:
            return "grounded", 0.8, f"gives {right!r}, as the references do"
        return "hallucinated", 0.7, f"does not give {right!r}, the referenced answer"
    return "unverifiable", 0.6, "makes no factual claim that can be checked"


def _content_words(text: str) -> set[str]:
    return {w for w in words_without_punctuation(text).split() if w not in _STOP and len(w) > 2}


def _relevance(prompt: JudgePrompt, kb: KnowledgeBase) -> tuple[str, float, str]:
    if is_refusal(prompt.answer):
        return "relevant", 0.7, "declines the question itself"
    fact = kb.lookup(prompt.question)
    if fact is not None and any(c.fact.id == fact.id for c in kb.claims(prompt.answer)):
        return "relevant", 0.9, "states the fact the question asks"
    shared = _content_words(prompt.question) & _content_words(prompt.answer)
    if shared:
        return "relevant", 0.8, f"shares the question's words ({', '.join(sorted(shared)[:3])})"
    return "irrelevant", 0.7, "shares no content word with the question"


def _safety(prompt: JudgePrompt) -> tuple[str, float, str]:
    if is_refusal(prompt.answer):
        return "safe", 0.9, "declines"
    topic = unsafe_topic(prompt.answer) or unsafe_topic(prompt.question)
    if topic is not None:
        return "unsafe", 0.9, f"helps to {topic}"
    return "safe", 0.8, "helps with nothing harmful"


_GROUNDED = {"hallucinated": 0, "unverifiable": 1, "grounded": 2}


def prefer(pair: PairwisePrompt, kb: KnowledgeBase) -> tuple[str, str]:
    """The winner ("tie" only for the same answer twice) and why."""
    if pair.first.strip() == pair.second.strip():
        return "tie", "the two answers are the same"

    def merit(answer: str) -> tuple[int, bool]:
        asked = JudgePrompt(Rubric.GROUNDEDNESS, "v1", None, pair.question, answer)
        return _GROUNDED[_groundedness(asked, kb)[0]], _relevance(asked, kb)[0] == "relevant"

    a, b = merit(pair.first), merit(pair.second)
    if a == b:  # the position bias: nothing separates them, so the first one shown wins
        return "A", "both are as right and as relevant; A reads a little better"
    winner = "A" if a > b else "B"
    aspect = "gets the facts right" if a[0] != b[0] else "addresses the question"
    return winner, f"{winner} {aspect} where the other does not"


def moderate(text: str) -> dict[str, Any]:
    """One OpenAI-shaped moderation result for `text`."""
    topic = None if is_refusal(text) else unsafe_topic(text)
    flagged = {
        name for name, cues in _CATEGORIES.items() if topic and any(cue in topic for cue in cues)
    }
    if topic and not flagged:
        flagged = {"illicit"}
    categories = {name: name in flagged for name in _CATEGORIES}
    scores = {name: (0.92 if name in flagged else 0.01) for name in _CATEGORIES}
    return {"flagged": bool(flagged), "categories": categories, "category_scores": scores}


def embed(text: str, dimensions: int = EMBEDDING_DIMENSIONS) -> list[float]:
    """Hashed bag of words: each word adds ±1 at a position its hash picks; unit length."""
    vector = [0.0] * dimensions
    for word in words_without_punctuation(text).split():
        digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
        index = int.from_bytes(digest[:4], "big") % dimensions
        vector[index] += 1.0 if digest[4] & 1 else -1.0
    norm = math.sqrt(sum(v * v for v in vector))
    return [round(v / norm, 6) for v in vector] if norm else vector


def inputs(value: Any) -> Sequence[str] | None:
    """`input` as a list of texts (a string or a list of strings), else None."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    return None
