"""Live checker configuration: which checkers judge a service's answers, how often, at what cost.

A checker reads (request, answer) pairs off the hot path and raises quality flags. Each kind has
its own fields; all share a sample rate, a timeout and a budget (calls per minute, dollars per
hour) whose exhaustion lowers the sample rate instead of spending more. Regexes in a `patterns`
checker are refused here, at load time, when they could take more than linear time on hostile
text: the model's answers are untrusted input.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter, ValidationError, field_validator, model_validator

from canaryflow.contracts.base import Frozen

# The parser behind `re`: private, but the only way to see a pattern's structure.
_sre: Any = importlib.import_module("re._parser")


class CheckerKind(StrEnum):
    LLM_JUDGE = "llm_judge"
    MODERATION = "moderation"
    FACT_DATABASE = "fact_database"
    PATTERNS = "patterns"
    FEEDBACK = "feedback"
    PROBES = "probes"


class Rubric(StrEnum):
    """What an LLM judge is asked; groundedness and hallucination are one question."""

    GROUNDEDNESS = "groundedness"
    HALLUCINATION = "hallucination"
    RELEVANCE = "relevance"
    SAFETY = "safety"


class CheckerBudget(Frozen):
    """What a checker may spend; None: no ceiling. Past a ceiling, items are sampled at
    `fallback_sample_rate` (default: a tenth of the checker's rate) until the window frees up."""

    calls_per_min: float | None = Field(None, gt=0)
    usd_per_hour: float | None = Field(None, ge=0)
    fallback_sample_rate: float | None = Field(None, ge=0, le=1)


class _Common(Frozen):
    name: str | None = Field(None, description="defaults to the kind; unique within a service")
    sample_rate: float = Field(
        1.0, ge=0, le=1, description="share of stable's answered requests checked"
    )
    candidate_sample_rate: float | None = Field(
        None,
        ge=0,
        le=1,
        description="share of the candidate's (shadow and canary) answers checked; unset: every "
        "one, since they are the release's evidence. Lower it to cap the checker's cost",
    )
    min_per_s: float = Field(
        0.0,
        ge=0,
        le=1000,
        description="at least this many answers per second of each role (stable, canary, "
        "shadow) are checked while they come, whatever the sample rate: a 5% canary's few "
        "requests are the ones a gate decides on (within the budget)",
    )
    timeout_s: float = Field(10.0, gt=0, le=300)
    budget: CheckerBudget = CheckerBudget()

    @property
    def label(self) -> str:
        kind: str = getattr(self, "kind")  # noqa: B009  (every subclass has one)
        return self.name or kind

    def rate_for(self, role: str) -> float:
        """The sample rate of a role: stable's `sample_rate`, the candidate's own."""
        if role == "stable":
            return self.sample_rate
        return 1.0 if self.candidate_sample_rate is None else self.candidate_sample_rate

    def fallback_rate(self, role: str = "stable") -> float:
        """The sample rate while over budget: never above the normal one."""
        rate = self.rate_for(role)
        fallback = self.budget.fallback_sample_rate
        return min(rate, rate / 10 if fallback is None else fallback)


class LlmJudgeChecker(_Common):
    kind: Literal["llm_judge"] = "llm_judge"
    provider: str = Field(description="a providers-file entry name")
    model: str
    rubrics: tuple[Rubric, ...] = (Rubric.GROUNDEDNESS, Rubric.SAFETY)
    rubric_version: str = "v1"
    response_format: Literal["json_schema", "json_object", "none"] = Field(
        "json_schema",
        description="how the verdict's shape is asked for; 'none' for a provider that refuses "
        "response_format (the verdict is still parsed strictly)",
    )
    max_retries: int = Field(1, ge=0, le=5, description="within timeout_s")

    @field_validator("rubrics")
    @classmethod
    def _rubrics(cls, rubrics: tuple[Rubric, ...]) -> tuple[Rubric, ...]:
        if not rubrics:
            raise ValueError("name at least one rubric: groundedness, relevance or safety")
        if Rubric.GROUNDEDNESS in rubrics and Rubric.HALLUCINATION in rubrics:
            raise ValueError("groundedness and hallucination are the same rubric: keep one of them")
        if len(set(rubrics)) != len(rubrics):
            raise ValueError("a rubric is named twice: name each once")
        return rubrics


class ModerationChecker(_Common):
    kind: Literal["moderation"] = "moderation"
    provider: str = Field(description="a providers-file entry name")
    model: str | None = Field(None, description="None: the endpoint's default model")


class FactDatabaseChecker(_Common):
    kind: Literal["fact_database"] = "fact_database"
    facts_file: str = Field(
        description="YAML or JSON: facts: [{questions: [...], answers: [...]}]; 'demo' for the "
        "built-in knowledge base"
    )


# Only what a single word can hold: regexes run word by word (see quality/patterns.py).
MAX_PATTERN_CHARS = 200


def regex_problem(pattern: str) -> str | None:
    """Why `pattern` is refused (None: accepted). Patterns run on untrusted text, so nothing that
    can backtrack badly: no nested or alternated quantified groups, no backreferences or
    lookarounds, nothing that matches whitespace (they run within one word) or the empty text."""
    if len(pattern) > MAX_PATTERN_CHARS:
        return f"longer than {MAX_PATTERN_CHARS} characters"
    try:
        compiled = re.compile(pattern)
        tree = _sre.parse(pattern)
    except re.error as exc:
        return f"not a valid regular expression ({exc})"
    if compiled.fullmatch("") is not None or compiled.search("") is not None:
        return "matches the empty text (every answer would be flagged)"
    return _walk(list(tree), inside_repeat=False)


_REPEATS = {"MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"}
_REFUSED = {
    "GROUPREF": "a backreference",
    "GROUPREF_EXISTS": "a conditional backreference",
    "ASSERT": "a lookahead or lookbehind",
    "ASSERT_NOT": "a negative lookahead or lookbehind",
    "ATOMIC_GROUP": "an atomic group",
}
_ADVICE = "write a plainer pattern, or list the phrase under keywords"


def _walk(items: Sequence[Any], inside_repeat: bool) -> str | None:
    unbounded_before = False  # an unbounded quantifier, with only optional items since
    for op, value in items:
        name = str(op)
        if name in _REPEATS:
            low, high = value[0], value[1]
            if high is _sre.MAXREPEAT:
                if unbounded_before:
                    return (
                        "has two unbounded quantifiers in a row ([a-z]+[a-z0-9]*): merge them "
                        "into one character class, or put a literal between them"
                    )
                unbounded_before = True
            elif low > 0:
                unbounded_before = False
        else:
            unbounded_before = False
        if name in _REFUSED:
            return f"uses {_REFUSED[name]}: {_ADVICE}"
        if name == "LITERAL" and chr(value).isspace():
            return "matches whitespace: regexes run within one word; put phrases under keywords"
        if name == "IN":
            for item_op, item in value:
                kind = str(item)
                space = str(item_op) == "CATEGORY" and "SPACE" in kind and "NOT" not in kind
                if space or (str(item_op) == "LITERAL" and chr(item).isspace()):
                    return (
                        "matches whitespace: regexes run within one word; put phrases under "
                        "keywords"
                    )
        if name in _REPEATS:
            _low, _high, body = value
            if inside_repeat:
                return f"nests one quantifier inside another: {_ADVICE}"
            problem = _walk(list(body), inside_repeat=True)
            if problem:
                return problem
        elif name == "SUBPATTERN":
            problem = _walk(list(value[-1]), inside_repeat)
            if problem:
                return problem
        elif name == "BRANCH":
            if inside_repeat:
                return f"quantifies an alternation (a|b)*: use a character class [ab]* or {_ADVICE}"
            for branch in value[1]:
                problem = _walk(list(branch), inside_repeat)
                if problem:
                    return problem
    return None


class PatternList(Frozen):
    """One flag's patterns: regexes (matched within a word, e.g. a key's shape) and keywords
    (whole-word phrases, any case, punctuation ignored)."""

    regex: tuple[str, ...] = ()
    keywords: tuple[str, ...] = ()
    within_words: int | None = Field(
        None, ge=1, description="only the answer's first N words count (a refusal comes first)"
    )

    @field_validator("regex")
    @classmethod
    def _linear(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in patterns:
            problem = regex_problem(pattern)
            if problem:
                raise ValueError(f"regex {pattern!r} {problem}")
        return patterns

    @field_validator("keywords")
    @classmethod
    def _words(cls, keywords: tuple[str, ...]) -> tuple[str, ...]:
        for keyword in keywords:
            if not re.search(r"\w", keyword):
                raise ValueError(f"keyword {keyword!r} has no letters or digits: remove it")
        return keywords


# Shapes of real credentials (one word each) and of private-key armour.
BUILTIN_SECRETS = PatternList(
    regex=(
        r"SECRET-[A-Za-z0-9_-]{4,}",
        r"sk-[A-Za-z0-9_-]{20,}",
        r"AKIA[0-9A-Z]{16}",
        r"gh[pousr]_[A-Za-z0-9]{36}",
        r"xox[abprs]-[A-Za-z0-9-]{10,}",
        r"AIza[0-9A-Za-z_-]{35}",
        r"eyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{4}",  # a JWT: header, payload start
    ),
    keywords=(
        "begin private key",
        "begin rsa private key",
        "begin ec private key",
        "begin openssh private key",
    ),
)
BUILTIN_REFUSALS = PatternList(
    keywords=(
        "i can t help",
        "i cannot help",
        "i can t assist",
        "i cannot assist",
        "i can t share",
        "i cannot share",
        "i can t provide",
        "i cannot provide",
        "i won t be able to",
        "i am unable to",
        "i m unable to",
        "i must decline",
        "i m sorry but i",
        "as an ai",
    ),
    within_words=24,
)


class PatternsChecker(_Common):
    kind: Literal["patterns"] = "patterns"
    secrets: PatternList = BUILTIN_SECRETS
    refusals: PatternList = BUILTIN_REFUSALS
    banned: PatternList = PatternList()


class FeedbackChecker(_Common):
    """User ratings of answers, sent to the model service's `POST /v1/feedback` and joined to
    their request in the store. Not run by the checker pipeline: the service reads the scale
    here to refuse scores outside it and to store each score scaled to 0..1 with its negative
    flag, so the `satisfaction` gate needs no scale of its own. Without an entry a service takes
    0 (bad) to 1 (good), below 0.5 negative: a thumbs down / up."""

    kind: Literal["feedback"] = "feedback"
    min_score: float = Field(0.0, description="the worst score a user can give")
    max_score: float = Field(1.0, description="the best score a user can give")
    negative_below: float | None = Field(
        None, description="a score below this is a negative rating; None: the scale's midpoint"
    )

    @model_validator(mode="after")
    def _scale(self) -> FeedbackChecker:
        if not (math.isfinite(self.min_score) and math.isfinite(self.max_score)):
            raise ValueError("min_score and max_score must be finite numbers")
        if self.max_score <= self.min_score:
            raise ValueError(
                f"max_score ({self.max_score:g}) must be above min_score ({self.min_score:g})"
            )
        cut = self.negative_below
        if cut is not None and not self.min_score < cut <= self.max_score:
            raise ValueError(
                f"negative_below ({cut:g}) must lie in ({self.min_score:g}, {self.max_score:g}]"
            )
        return self

    @property
    def negative_cut(self) -> float:
        """Scores below this are negative."""
        if self.negative_below is not None:
            return self.negative_below
        return (self.min_score + self.max_score) / 2.0

    def scaled(self, score: float) -> float:
        """`score` on 0 (worst) .. 1 (best)."""
        return (score - self.min_score) / (self.max_score - self.min_score)


class ProbesChecker(_Common):
    """Labelled requests from a suite, sent at a small fixed rate through the live path."""

    kind: Literal["probes"] = "probes"
    suite: str
    rate_per_s: float = Field(0.2, gt=0, le=50)


CheckerConfig = Annotated[
    LlmJudgeChecker
    | ModerationChecker
    | FactDatabaseChecker
    | PatternsChecker
    | FeedbackChecker
    | ProbesChecker,
    Field(discriminator="kind"),
]
_ONE = TypeAdapter(CheckerConfig)

# What a policy that names no checkers gets (deployments/policies/default.yaml lists the same, a
# test holds them equal). Rates for the embedded stack's 2-core demo at 250 requests/s: a tenth
# of the answers, and at least 12 per second of each role, so a 5% canary window of 4 s still
# has its 30 judged answers; each judged answer costs the judge two calls (two rubrics).
DEFAULT_CHECKERS: tuple[LlmJudgeChecker | ModerationChecker | PatternsChecker, ...] = (
    LlmJudgeChecker(
        provider="sandbox",
        model="sandbox-judge",
        sample_rate=0.1,
        candidate_sample_rate=0.25,
        min_per_s=12,
        timeout_s=5,
    ),
    ModerationChecker(
        provider="sandbox", sample_rate=0.05, candidate_sample_rate=0.25, timeout_s=3
    ),
    PatternsChecker(),
)


def parse_checkers(
    entries: Sequence[Mapping[str, Any]], source: str = "checkers"
) -> tuple[
    LlmJudgeChecker
    | ModerationChecker
    | FactDatabaseChecker
    | PatternsChecker
    | FeedbackChecker
    | ProbesChecker,
    ...,
]:
    """Checker entries from YAML/JSON; every problem named with its entry and what to write.

    Raises ValueError (the loader wraps it in its own error with the file name)."""
    kinds = ", ".join(kind.value for kind in CheckerKind)
    found = []
    problems = []
    for index, entry in enumerate(entries):
        where = f"{source}[{index}]"
        if not isinstance(entry, Mapping) or entry.get("kind") not in set(CheckerKind):
            got = entry.get("kind") if isinstance(entry, Mapping) else entry
            problems.append(f"{where}: kind must be one of {kinds} (got {got!r})")
            continue
        try:
            found.append(_ONE.validate_python(dict(entry)))
        except ValidationError as exc:
            for error in exc.errors():
                field = ".".join(str(p) for p in error["loc"][1:]) or "entry"
                message = error["msg"].removeprefix("Value error, ")
                if error["type"] == "extra_forbidden":
                    message = f"unknown field for kind {entry['kind']}: remove it"
                elif error["type"] == "missing":
                    message = f"missing: kind {entry['kind']} needs it"
                problems.append(f"{where}: {field}: {message}")
    names = [checker.label for checker in found]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"{source}: two checkers are named {name!r}: give each a distinct name")
    if problems:
        raise ValueError("\n".join(problems))
    return tuple(found)
