"""What the sandbox says: one request's answer, from its profile and its own PRNG."""

from __future__ import annotations

import json
import random
import re
import struct
from collections.abc import Sequence
from typing import Any

from canaryflow.quality.knowledge import (
    REFUSAL_TEXT,
    Fact,
    KnowledgeBase,
    find_secret,
    is_injection_attempt,
    unsafe_topic,
    words_without_punctuation,
)
from canaryflow.sandbox.profiles import Profile

# The sandbox's own tag on an unsafe answer it complies with: only its tests read it. No live
# checker looks for it (a real model never writes it); moderation and the judge read the words.
UNSAFE_MARKER = "UNSAFE-CONTENT"


def is_unsafe_output(text: str) -> bool:
    """The sandbox tagged this answer unsafe (for the sandbox's tests)."""
    return UNSAFE_MARKER in text


_ECHO = re.compile(
    r"^(?:please\s+)?(?:repeat|say|reply with|respond with|answer with)\s+"
    r"(?:exactly|verbatim|only)\s*:?\s*(.+?)\s*$",
    re.IGNORECASE | re.DOTALL,
)
_ARITHMETIC = re.compile(
    r"\bwhat is (-?\d{1,9})\s*(\+|-|\*|x|plus|minus|times|multiplied by)\s*(-?\d{1,9})\b",
    re.IGNORECASE,
)
_OPERATIONS = {"+": "+", "plus": "+", "-": "-", "minus": "-"}
_JSON_KEYS = re.compile(r"\b(?:keys|fields)\b\s*:?\s*(.+?)(?:[.:?!\n]|$)", re.IGNORECASE)
_NOT_KEYS = {"and", "or", "the", "named", "called"}
_OPENERS = (
    "Here is a short answer about {topic}.",
    "Good question about {topic}.",
    "On {topic}, here is what usually works.",
)
_BODIES = (
    "Start from the defaults and change one setting at a time.",
    "The documentation covers this in its getting started guide.",
    "Most teams solve this with a small configuration change.",
    "Check the settings page first, then the logs if it still fails.",
)
_PADDING = (
    "This answer reflects widely accepted reference material.",
    "Please let me know whether you would like further detail on this topic.",
    "Feel free to ask a follow-up question whenever it suits you.",
    "Several trustworthy sources agree on this point.",
    "Happy to expand on any part of this answer.",
    "This kind of question comes up often, so the short version is above.",
)
_LEAK = "Sure, here it is: the token is {secret}."
_KEEP_SECRET = "I can't share that information, but I'm happy to help with something else."
_COMPLY = (
    f"{UNSAFE_MARKER}: Sure, here is how to {{topic}}. Step one ... "
    "[sandbox placeholder for a harmful answer; no real instructions]"
)


class Answerer:
    """One request's answer, from a 32-byte digest: the same digest, the same answer."""

    def __init__(self, knowledge: KnowledgeBase, profile: Profile, digest: bytes) -> None:
        self.knowledge, self.profile, self._digest = knowledge, profile, digest
        self._rng: random.Random | None = None
        # Read in a fixed order from the digest, so every profile sees the same numbers.
        draws = [n / 2**32 for n in struct.unpack(">5I", digest[:20])]
        self.u_hallucinate, self.u_refuse, self.u_inject, self.u_unsafe, self.u_format = draws

    @property
    def rng(self) -> random.Random:
        """For word choices; seeded only when an answer needs one (most do not)."""
        if self._rng is None:
            self._rng = random.Random(self._digest)
        return self._rng

    def answer(
        self, user: str, prompt: str, tools: Sequence[Any]
    ) -> tuple[str | None, list[dict[str, Any]] | None]:
        p = self.profile
        words = words_without_punctuation(user)
        if is_injection_attempt(words, normalised=True):
            secret = find_secret(prompt)
            leak = secret is not None and self.u_inject < p.injection
            return (_LEAK.format(secret=secret) if leak else _KEEP_SECRET), None
        topic = unsafe_topic(words, normalised=True)
        if topic is not None:
            comply = self.u_unsafe < p.unsafe
            return (_COMPLY.format(topic=topic) if comply else REFUSAL_TEXT), None
        question = _question_of(user)
        call = self._tool_call(tools, question) if tools else None
        if call is not None:
            return None, [call]
        if self.u_refuse < p.refusal:
            return REFUSAL_TEXT, None
        echo = _ECHO.match(question)
        if echo:
            return echo.group(1).strip("\"'`"), None
        fact = self.knowledge.lookup(user)
        weak = fact is not None and fact.category in p.weak_categories
        hallucinate = self.u_hallucinate < (p.weak_hallucination if weak else p.hallucination)
        core, sentence = self._core(question, fact, hallucinate)
        if "json" in user.lower():
            return self._json(user, question, fact, core or sentence), None
        return self._pad(sentence), None

    def _core(self, question: str, fact: Fact | None, wrong: bool) -> tuple[str | None, str]:
        """(short answer or None, the sentence stating it)."""
        sums = _ARITHMETIC.search(question)
        if sums:
            a, operation, b = int(sums.group(1)), sums.group(2).lower(), int(sums.group(3))
            symbol = _OPERATIONS.get(operation, "*")
            result = a + b if symbol == "+" else a - b if symbol == "-" else a * b
            if wrong:
                result += self.rng.choice((-2, -1, 1, 2))
            return str(result), f"{a} {symbol} {b} = {result}."
        if fact is not None:
            answer = self.rng.choice(fact.wrong_answers) if wrong else fact.answer
            return answer, fact.state(answer)
        topic = " ".join(question.rstrip(" ?!.").split()[:8]) or "this"
        if topic[1:2].islower():
            topic = topic[0].lower() + topic[1:]
        opener = self.rng.choice(_OPENERS).format(topic=topic)
        return None, f"{opener} {self.rng.choice(_BODIES)}"

    def _pad(self, text: str) -> str:
        words = text.split()
        target = round(len(words) * self.profile.verbosity)
        if target <= len(words):
            return text
        extra: list[str] = []
        start = self.rng.randrange(len(_PADDING))
        for i in range(start, start + target):
            if len(words) + len(extra) >= target:
                break
            extra.extend(_PADDING[i % len(_PADDING)].split())
        tail = " ".join(extra[: target - len(words)]).rstrip(",.")
        return f"{text} {tail}."

    def _json(self, user: str, question: str, fact: Fact | None, answer: str) -> str:
        found = _JSON_KEYS.search(user)
        names = re.findall(r"[A-Za-z_]\w*", found.group(1)) if found else []
        keys = [name for name in names if name.lower() not in _NOT_KEYS] or ["answer", "confidence"]
        values: dict[str, Any] = {
            "answer": answer,
            "confidence": round(0.8 + 0.19 * self.rng.random(), 2),
            "category": fact.category if fact else "general",
            "question": fact.question if fact else question,
            "sources": [],
        }
        document = {key: values.get(key, answer) for key in keys}
        text = json.dumps(document)
        if self.u_format < self.profile.format_error:
            return "Sure! Here is the JSON you asked for: " + text[:-1].replace('"', "")
        return text

    def _tool_call(self, tools: Sequence[Any], question: str) -> dict[str, Any] | None:
        words = set(words_without_punctuation(question).split())
        for tool in tools:
            function = tool.get("function") if isinstance(tool, dict) else None
            name = function.get("name") if isinstance(function, dict) else None
            if not isinstance(function, dict) or not isinstance(name, str):
                continue
            parts = [part for part in re.split(r"[^a-z0-9]+", name.lower()) if part]
            if parts and all(part in words or f"{part}s" in words for part in parts):
                arguments = _arguments(function.get("parameters"), question)
                return {
                    "id": f"call_{self.rng.getrandbits(96):024x}",
                    "type": "function",
                    "function": {"name": name, "arguments": json.dumps(arguments)},
                }
        return None


def _arguments(schema: Any, question: str) -> dict[str, Any]:
    """Plausible arguments for a JSON-Schema object: text fields get the request itself."""
    properties = schema.get("properties") if isinstance(schema, dict) else None
    defaults: dict[str, Any] = {"integer": 1, "number": 1.0, "boolean": False, "array": []}
    arguments: dict[str, Any] = {}
    for key, spec in (properties or {}).items():
        spec = spec if isinstance(spec, dict) else {}
        if isinstance(spec.get("enum"), list) and spec["enum"]:
            arguments[key] = spec["enum"][0]
        else:
            arguments[key] = defaults.get(str(spec.get("type")), question[:200])
    return arguments


def _question_of(user: str) -> str:
    """The user's own words: after the template's 'Question:', else its last paragraph."""
    at = user.rfind("Question:")
    if at >= 0:
        return user[at + len("Question:") :].strip()
    paragraphs = [part for part in user.split("\n\n") if part.strip()]
    return paragraphs[-1].strip() if paragraphs else ""
