"""Behaviour profiles: what each sandbox model name does, and `name@field=value` overrides."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

from canaryflow.errors import ConfigError

_RATES = (
    "error_rate",
    "rate_429",
    "hallucination",
    "weak_hallucination",
    "refusal",
    "injection",
    "unsafe",
    "format_error",
    "ttft_share",
    "truncated_stream",
    "garbage",
    "tail_share",
)


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    latency_ms: float = 40.0  # median
    sigma: float = 0.3  # lognormal shape; 0 = always the median
    tail_share: float = 0.0  # requests made `tail_factor` times slower: a slow tail, same median
    tail_factor: float = 1.0
    error_rate: float = 0.002  # HTTP 500
    rate_429: float = 0.0
    retry_after: float = 0.05  # seconds, sent in Retry-After with a 429
    hallucination: float = 0.002  # fact questions; a healthy model sits under the 0.5% gate
    weak_categories: tuple[str, ...] = ()  # fact categories answered at weak_hallucination
    weak_hallucination: float = 0.0
    refusal: float = 0.005  # benign prompts refused
    verbosity: float = 1.0  # >= 1: padding factor for fact and generic answers
    injection: float = 0.02  # injection probes that leak the secret
    unsafe: float = 0.0  # unsafe requests complied with
    format_error: float = 0.0  # JSON requests answered with broken JSON
    ttft_share: float = 0.3  # streamed: the share of the latency spent before the first token
    truncated_stream: float = 0.0  # streamed answers cut off mid-answer (connection dropped)
    garbage: float = 0.0  # sandbox-judge: verdicts that are not a verdict (prose, missing fields)

    def validate(self) -> Profile:
        problems = [f"{n} must be within [0, 1]" for n in _RATES if not 0 <= getattr(self, n) <= 1]
        if self.error_rate + self.rate_429 > 1:
            problems.append("error_rate + rate_429 must not exceed 1")
        if not 1 <= self.tail_factor < math.inf:
            problems.append("tail_factor must be a finite number >= 1")
        for name in ("latency_ms", "sigma", "retry_after"):
            if not 0 <= getattr(self, name) < math.inf:
                problems.append(f"{name} must be a finite number >= 0")
        if not 1 <= self.verbosity <= 20:
            problems.append("verbosity must be within [1, 20]")
        if problems:
            raise ConfigError(f"profile {self.name!r}: " + "; ".join(problems))
        return self


BASE = Profile(name="sandbox-base")
PROFILES: dict[str, Profile] = {
    profile.name: profile
    for profile in (
        BASE,
        replace(BASE, name="sandbox-good", hallucination=0.001),
        replace(BASE, name="sandbox-hallucinating", hallucination=0.15),
        replace(BASE, name="sandbox-slow", latency_ms=72.0),
        replace(BASE, name="sandbox-tail-slow", tail_share=0.05, tail_factor=4.0),
        replace(
            BASE,
            name="sandbox-live-hallucinating",
            weak_categories=("currency", "literature"),
            weak_hallucination=0.3,
        ),
        replace(BASE, name="sandbox-verbose", verbosity=4.0),
        replace(BASE, name="sandbox-injectable", injection=0.4),
        replace(BASE, name="sandbox-unsafe", unsafe=0.3),
        replace(BASE, name="sandbox-flaky", error_rate=0.1, rate_429=0.1),
        # Checker endpoints (sandbox/judging.py): the judge answers rubric prompts with verdicts.
        replace(BASE, name="sandbox-judge", latency_ms=20.0, error_rate=0.0, refusal=0.0),
        replace(BASE, name="sandbox-moderation", latency_ms=5.0, sigma=0.0, error_rate=0.0),
        replace(BASE, name="sandbox-embedding", latency_ms=5.0, sigma=0.0, error_rate=0.0),
    )
}
_FIELDS = {f.name: type(getattr(BASE, f.name)) for f in fields(Profile) if f.name != "name"}


def resolve_profile(model: str) -> Profile | None:
    """`name@field=value,...` -> Profile; None for an unknown name; ConfigError if malformed."""
    name, _, overrides = model.partition("@")
    profile = PROFILES.get(name.strip())
    if profile is None or not overrides:
        return profile
    changes: dict[str, Any] = {}
    for item in overrides.split(","):
        key, equals, raw = (part.strip() for part in item.partition("="))
        if not equals or key not in _FIELDS:
            raise ConfigError(
                f"model {model!r}: cannot override {item.strip()!r}; write field=value with a "
                f"field among: {', '.join(_FIELDS)}"
            )
        if _FIELDS[key] is tuple:
            changes[key] = tuple(part for part in raw.split("|") if part)
            continue
        try:
            changes[key] = float(raw)
        except ValueError:
            raise ConfigError(f"model {model!r}: {key} must be a number, got {raw!r}") from None
    return replace(profile, name=model, **changes).validate()
