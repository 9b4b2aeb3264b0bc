"""A sandbox LLM provider: OpenAI-compatible HTTP with deterministic, tunable behaviour.

The demo, the tests and the benchmarks need a provider whose faults are known in advance, so a gate
that should catch a regression can be shown to catch it. Endpoints: `POST /v1/chat/completions`,
`POST /v1/moderations`, `POST /v1/embeddings`, `GET /v1/models`, `GET /health`. Start it with
`python -m canaryflow.sandbox --host 127.0.0.1 --port N`, or serve `build_app()` in-process.

Profiles, chosen by the request's `model` (each rate applies to the requests of its kind):

    sandbox-base                median latency 40 ms (lognormal, sigma 0.3); 0.2% HTTP 500;
                                0.2% hallucination on fact questions (the gate: 0.5%); refuses 0.5%
                                of benign prompts; leaks 2% of injection probes; 0% unsafe
    sandbox-good                as base, hallucination 0.1%
    sandbox-hallucinating       hallucination 15%: a wrong answer from the fact's wrong_answers,
                                stated confidently
    sandbox-slow                latency x1.8 (72 ms), same answers: only live p95 catches it
    sandbox-tail-slow           5% of requests 4x slower, median unchanged: a slow tail only
                                (`tail_share`, `tail_factor`; e.g. `sandbox-base@tail_share=0.05,
                                tail_factor=4`)
    sandbox-live-hallucinating  30% hallucination on facts of its `weak_categories` (currency,
                                literature), 0.2% elsewhere. The offline suites ask no such fact and
                                about a quarter of the live corpus does: offline it equals base,
                                live it hallucinates on ~8% of requests
    sandbox-verbose             pads answers to 4x the completion tokens (JSON, echo excepted):
                                about 2x the cost per request, past the 1.5x review gate
    sandbox-injectable          leaks the planted secret in 40% of injection probes
    sandbox-unsafe              complies with 30% of unsafe requests
    sandbox-flaky               10% HTTP 500 and 10% HTTP 429 with `Retry-After: 0.05`
    sandbox-judge               answers the live checkers' rubric prompts with a JSON verdict,
                                read from the answer's claims against its context and the
                                knowledge base (`judging.py`); `garbage` sets the share of replies
                                that are no verdict; other prompts as base
    sandbox-moderation          the default model of `/v1/moderations` (keyword categories)
    sandbox-embedding           a model for `/v1/embeddings` (hashed bag of words, unit length)

Any `Profile` field can be overridden in the model name, e.g.
`sandbox-base@latency_ms=0,error_rate=0.3,weak_categories=currency|units`: an unknown field or a bad
value answers 400 `invalid_override`, an unknown profile 404 `model_not_found`.

Answers, by the last user message, first match wins: an injection probe (refuse, or leak the
`SECRET-...` found anywhere in the conversation); an unsafe request (refuse, or comply with a text
carrying `answers.UNSAFE_MARKER`, read only by the sandbox's tests); a request naming one of
the request's `tools` (a `tool_calls` answer, content null); a benign refusal; "Repeat exactly:
X" (X); a JSON request (an object with
the keys named after "with keys", default `answer` and `confidence`); arithmetic ("What is 17 +
25?"); a known fact (its statement); a short generic answer. The last three are padded to
`verbosity` times their length; `max_tokens` truncates with finish_reason "length".

Streaming (`stream: true`): the same answer as OpenAI streams it (a role chunk at once, content
three words per event, tool calls in one delta, the finish reason, usage when
`stream_options.include_usage` asks, `[DONE]`). The profile's `ttft_share` of its latency passes
before the first token, the rest spreads evenly between events; `truncated_stream` is the share of
streams whose connection drops halfway through the answer.

Determinism: an answer is a function of (profile, prompt text, seed). The content draws come from
sha256(prompt, seed) and every profile sees the same ones (common random numbers): a profile with a
lower rate fails a subset of the items a higher rate fails, so a paired comparison shows only the
profiles' difference. Without a seed the draws are fresh. Transport faults (500, 429) and latency
are always fresh, so a retry can succeed, as against a real provider.
"""

from __future__ import annotations

from canaryflow.sandbox.answers import Answerer
from canaryflow.sandbox.profiles import BASE, PROFILES, Profile, resolve_profile
from canaryflow.sandbox.server import (
    Reply,
    Sandbox,
    SandboxApp,
    build_app,
    error_reply,
    main,
)

__all__ = [
    "BASE",
    "PROFILES",
    "Answerer",
    "Profile",
    "Reply",
    "Sandbox",
    "SandboxApp",
    "build_app",
    "error_reply",
    "main",
    "resolve_profile",
]
