"""The sandbox's HTTP face: request parsing, transport faults, OpenAI-shaped replies, ASGI, CLI."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import importlib.util
import json
import math
import os
import random
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import unquote

from starlette.types import Receive, Scope, Send

from canaryflow.dataplane.public import read_body
from canaryflow.errors import ConfigError
from canaryflow.providers.client import TOKENS_PER_WORD, estimate_tokens
from canaryflow.quality.knowledge import KnowledgeBase
from canaryflow.sandbox.answers import Answerer
from canaryflow.sandbox.judging import EMBEDDING_DIMENSIONS, embed, inputs, judge_reply, moderate
from canaryflow.sandbox.profiles import PROFILES, Profile, resolve_profile

MAX_BODY_BYTES = 4 * 1024 * 1024
JUDGE_MODEL = "sandbox-judge"
MODERATION_MODEL = "sandbox-moderation"


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: dict[str, Any]
    delay_s: float = 0.0
    headers: tuple[tuple[bytes, bytes], ...] = ()
    stream: Stream | None = None  # a 200 to a `stream: true` request: sent as SSE


@dataclass(frozen=True, slots=True)
class Stream:
    """How a streamed answer is paced: `delay_s` (the profile's latency) split into the wait
    for the first token (`ttft_share` of it) and even gaps between the rest."""

    ttft_share: float
    include_usage: bool
    cut: bool  # drop the connection mid-answer (the profile's `truncated_stream`)


class BadRequest(ConfigError):
    """A request the sandbox refuses to answer; carries its OpenAI-style error fields."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


def error_reply(status: int, message: str, kind: str, code: str, param: str | None = None) -> Reply:
    error = {"message": message, "type": kind, "param": param, "code": code}
    return Reply(status=status, body={"error": error})


class Sandbox:
    """Turns a chat-completions request body into a Reply; no I/O, so usable in-process."""

    def __init__(self, knowledge: KnowledgeBase | None = None) -> None:
        self.knowledge = knowledge or KnowledgeBase.load()
        self._profiles: dict[str, Profile | None] = {}
        self._fresh = random.Random()

    def profile(self, model: str) -> Profile | None:
        if model not in self._profiles:
            if len(self._profiles) > 1024:
                self._profiles.clear()
            self._profiles[model] = resolve_profile(model)
        return self._profiles[model]

    def reply(self, raw: bytes) -> Reply:
        try:
            request = _parse(raw)
            model = request["model"]
            profile = self.profile(model)
        except BadRequest as exc:
            return error_reply(exc.status, str(exc), "invalid_request_error", exc.code, exc.param)
        except ConfigError as exc:
            return error_reply(400, str(exc), "invalid_request_error", "invalid_override", "model")
        if profile is None:
            known = ", ".join(PROFILES)
            message = f"The model `{model}` does not exist. Sandbox profiles: {known}."
            return error_reply(404, message, "invalid_request_error", "model_not_found", "model")
        return self._transport(profile) or self._complete(profile, request)

    def _transport(self, profile: Profile) -> Reply | None:
        draw = self._fresh.random()
        if draw < profile.rate_429:
            message = f"Rate limit reached (sandbox); retry after {profile.retry_after:g} s."
            reply = error_reply(429, message, "rate_limit_error", "rate_limit_exceeded")
            return replace(reply, headers=((b"retry-after", f"{profile.retry_after:g}".encode()),))
        if draw < profile.rate_429 + profile.error_rate:
            message = "The sandbox failed this request on purpose (error_rate); retry it."
            reply = error_reply(500, message, "server_error", "sandbox_injected_error")
            return replace(reply, delay_s=self._latency(profile))
        return None

    def _latency(self, profile: Profile) -> float:
        if profile.latency_ms <= 0:
            return 0.0
        seconds = profile.latency_ms / 1000 * math.exp(profile.sigma * self._fresh.gauss(0.0, 1.0))
        # A draw only for a profile with a tail: the others' streams of draws stay as they were.
        if profile.tail_share > 0 and self._fresh.random() < profile.tail_share:
            seconds *= profile.tail_factor
        return seconds

    def _complete(self, profile: Profile, request: dict[str, Any]) -> Reply:
        messages: list[tuple[str, str]] = request["messages"]
        prompt = "\n".join(f"{role}: {text}" for role, text in messages)
        user = next((text for role, text in reversed(messages) if role == "user"), messages[-1][1])
        verdict = None
        content: str | None
        tool_calls: list[dict[str, Any]] | None
        if request["model"].partition("@")[0].strip() == JUDGE_MODEL:
            system = "\n".join(text for role, text in messages if role in ("system", "developer"))
            garbage_draw = self._fresh.random()
            verdict = judge_reply(system, user, self.knowledge, garbage_draw, profile.garbage)
        if verdict is not None:
            content, tool_calls = verdict, None
        else:
            seed = request.get("seed")
            if seed is None:
                digest = self._fresh.getrandbits(256).to_bytes(32, "big")
            else:
                digest = hashlib.sha256(f"{prompt}\x00{seed}".encode()).digest()
            content, tool_calls = Answerer(self.knowledge, profile, digest).answer(
                user, prompt, request.get("tools") or ()
            )
        finish = "tool_calls" if tool_calls else "stop"
        produced = json.dumps(tool_calls) if tool_calls else content or ""
        completion_tokens = estimate_tokens(produced)
        limit = request.get("max_tokens")
        if content is not None and limit is not None and completion_tokens > limit:
            content = " ".join(content.split()[: max(1, int(limit / TOKENS_PER_WORD))])
            completion_tokens, finish = estimate_tokens(content), "length"
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if tool_calls:
            message["tool_calls"] = tool_calls
        prompt_tokens = math.ceil(sum(len(t.split()) for _, t in messages) * TOKENS_PER_WORD)
        body = {
            "id": f"chatcmpl-{self._fresh.getrandbits(96):024x}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request["model"],
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
        stream = None
        if request.get("stream"):
            stream = Stream(
                ttft_share=profile.ttft_share,
                include_usage=bool((request.get("stream_options") or {}).get("include_usage")),
                cut=self._fresh.random() < profile.truncated_stream,
            )
        return Reply(status=200, body=body, delay_s=self._latency(profile), stream=stream)

    def checker_reply(self, path: str, raw: bytes) -> Reply:
        """`/moderations` or `/embeddings`: the model (default: the sandbox's own) picks the
        profile whose error rate and latency apply."""
        moderation = path.endswith("/moderations")
        try:
            request = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            return error_reply(400, f"The body is not valid JSON ({exc}).", *_INVALID)
        if not isinstance(request, dict):
            return error_reply(400, "The body must be a JSON object.", *_INVALID)
        model = request.get("model") or (MODERATION_MODEL if moderation else None)
        if not isinstance(model, str):
            message = "Missing `model`: name a sandbox profile, e.g. sandbox-embedding."
            return error_reply(400, message, "invalid_request_error", "missing_model", "model")
        texts = inputs(request.get("input"))
        if texts is None:
            message = "`input` must be a string or a non-empty list of strings."
            return error_reply(400, message, "invalid_request_error", "invalid_value", "input")
        try:
            profile = self.profile(model)
        except ConfigError as exc:
            return error_reply(400, str(exc), "invalid_request_error", "invalid_override", "model")
        if profile is None:
            message = (
                f"The model `{model}` does not exist. Sandbox profiles: {', '.join(PROFILES)}."
            )
            return error_reply(404, message, "invalid_request_error", "model_not_found", "model")
        faulted = self._transport(profile)
        if faulted is not None:
            return faulted
        delay = self._latency(profile)
        if moderation:
            body = {
                "id": f"modr-{self._fresh.getrandbits(64):016x}",
                "model": model,
                "results": [moderate(text) for text in texts],
            }
            return Reply(200, body, delay_s=delay)
        dimensions = request.get("dimensions", EMBEDDING_DIMENSIONS)
        if (
            isinstance(dimensions, bool)
            or not isinstance(dimensions, int)
            or not 1 <= dimensions <= 4096
        ):
            message = "`dimensions` must be an integer within [1, 4096]."
            return error_reply(400, message, "invalid_request_error", "invalid_value", "dimensions")
        data = [
            {"object": "embedding", "index": i, "embedding": embed(text, dimensions)}
            for i, text in enumerate(texts)
        ]
        tokens = sum(estimate_tokens(text) for text in texts)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return Reply(200, {"object": "list", "data": data, "model": model, "usage": usage}, delay)


_INVALID = ("invalid_request_error", "invalid_json")
CHECKER_PATHS = ("/v1/moderations", "/moderations", "/v1/embeddings", "/embeddings")


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        request = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(400, f"The body is not valid JSON ({exc}).", "invalid_json") from None
    if not isinstance(request, dict):
        raise BadRequest(400, "The body must be a JSON object.", "invalid_json")
    if not isinstance(request.get("model"), str) or not request["model"]:
        raise BadRequest(400, "Missing `model`: name a sandbox profile.", "missing_model", "model")
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest(
            400, "`messages` must be a non-empty list.", "invalid_messages", "messages"
        )
    request["messages"] = [_message(item, i) for i, item in enumerate(messages)]
    for key in ("seed", "max_tokens", "max_completion_tokens"):
        value = request.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise BadRequest(400, f"`{key}` must be an integer.", "invalid_value", key)
    request["max_tokens"] = request.get("max_tokens") or request.get("max_completion_tokens")
    if request["max_tokens"] is not None and request["max_tokens"] < 1:
        raise BadRequest(400, "`max_tokens` must be at least 1.", "invalid_value", "max_tokens")
    if not isinstance(request.get("stream", False), bool):
        raise BadRequest(400, "`stream` must be true or false.", "invalid_value", "stream")
    if not isinstance(request.get("stream_options") or {}, dict):
        raise BadRequest(
            400, "`stream_options` must be an object.", "invalid_value", "stream_options"
        )
    if request.get("n", 1) != 1:
        raise BadRequest(400, "The sandbox answers n=1 only.", "unsupported", "n")
    if not isinstance(request.get("tools") or [], list):
        raise BadRequest(400, "`tools` must be a list.", "invalid_value", "tools")
    return request


def _message(item: Any, index: int) -> tuple[str, str]:
    if not isinstance(item, dict) or not isinstance(item.get("role"), str):
        raise BadRequest(400, f"messages[{index}] needs a `role`.", "invalid_messages", "messages")
    content = item.get("content")
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if isinstance(p, dict)]
        content = "\n".join(part for part in parts if isinstance(part, str))
    if content is None:
        content = ""
    if not isinstance(content, str):
        message = f"messages[{index}].content must be a string or a list of text parts."
        raise BadRequest(400, message, "invalid_messages", "messages")
    return item["role"], content


class SandboxApp:
    """A bare ASGI app: no framework on the hot path, no per-request logging.

    With `required_key` it plays a provider that wants a key (`Authorization: Bearer` or
    Azure's `api-key`), so the credential path is tested against a real refusal: 401 with an
    OpenAI-style body that, like OpenAI's, never echoes what was sent."""

    def __init__(self, sandbox: Sandbox, required_key: str | None = None) -> None:
        self.sandbox = sandbox
        self._key = required_key.encode() if required_key else None
        models = [
            {"id": n, "object": "model", "created": 0, "owned_by": "sandbox"} for n in PROFILES
        ]
        self._models = Reply(200, {"object": "list", "data": models})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path, method = scope["path"].rstrip("/"), scope["method"]
        refused = None if path == "/health" else self._refuse_key(scope)
        if refused is not None:
            reply = refused
        elif path in ("/v1/chat/completions", "/chat/completions"):
            if method != "POST":
                reply = error_reply(405, "Use POST.", "invalid_request_error", "method_not_allowed")
            else:
                raw = await read_body(scope, receive, MAX_BODY_BYTES)
                reply = (
                    self.sandbox.reply(raw)
                    if raw is not None
                    else error_reply(413, "Body too large.", "invalid_request_error", "too_large")
                )
                if reply.stream is not None:
                    await stream_reply(reply, reply.stream, send)
                    return
                if reply.delay_s > 0:
                    await asyncio.sleep(reply.delay_s)
        elif path in CHECKER_PATHS:
            if method != "POST":
                reply = error_reply(405, "Use POST.", "invalid_request_error", "method_not_allowed")
            else:
                raw = await read_body(scope, receive, MAX_BODY_BYTES)
                reply = (
                    self.sandbox.checker_reply(path, raw)
                    if raw is not None
                    else error_reply(413, "Body too large.", "invalid_request_error", "too_large")
                )
                if reply.delay_s > 0:
                    await asyncio.sleep(reply.delay_s)
        elif path in ("/v1/models", "/models") and method == "GET":
            reply = self._models
        elif path.startswith(("/v1/models/", "/models/")) and method == "GET":
            reply = _model(unquote(path.rpartition("/models/")[2]))
        elif path == "/health" and method == "GET":
            reply = Reply(200, {"status": "ok"})
        else:
            reply = error_reply(404, f"No route {method} {path}.", "invalid_request_error", "404")
        payload = json.dumps(reply.body, separators=(",", ":")).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
            *reply.headers,
        ]
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    def _refuse_key(self, scope: Scope) -> Reply | None:
        if self._key is None:
            return None
        sent = None
        for name, value in scope["headers"]:
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                sent = value[7:].strip()
            elif name == b"api-key":
                sent = value.strip()
        if sent is None:
            message = "You didn't provide an API key (Authorization: Bearer KEY, or api-key: KEY)."
            return error_reply(401, message, "invalid_request_error", "missing_api_key")
        if not hmac.compare_digest(sent, self._key):
            message = "Incorrect API key provided."
            return error_reply(401, message, "invalid_request_error", "invalid_api_key")
        return None


class StreamCut(ConnectionError):
    """Raised mid-stream on purpose: the server drops the connection without ending the body."""


async def stream_reply(reply: Reply, stream: Stream, send: Send) -> None:
    """The completion in `reply` as OpenAI streams it: a role chunk at once, content a few
    words per event after the first-token wait, tool calls in one delta, the finish reason,
    usage when asked (`stream_options.include_usage`), then `[DONE]`."""
    body = reply.body
    message = body["choices"][0]["message"]
    base = {k: body[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}

    def event(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return {
            "type": "http.response.body",
            "body": _sse(base | {"choices": [choice]} | extra),
            "more_body": True,
        }

    words = re.findall(r"\S+\s*", message.get("content") or "")
    pieces = ["".join(words[i : i + 3]) for i in range(0, len(words), 3)]
    ttft = reply.delay_s * stream.ttft_share
    gap = (reply.delay_s - ttft) / max(1, len(pieces) - 1)
    headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send(event({"role": "assistant", "content": ""}))
    await asyncio.sleep(ttft)
    for i, piece in enumerate(pieces):
        if i:
            await asyncio.sleep(gap)
        if stream.cut and i >= len(pieces) // 2:
            raise StreamCut("sandbox cut this stream on purpose (truncated_stream)")
        await send(event({"content": piece}))
    calls = message.get("tool_calls") or []
    if calls:
        await send(event({"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]}))
    await send(event({}, body["choices"][0]["finish_reason"]))
    if stream.include_usage:
        usage = {"type": "http.response.body", "more_body": True}
        await send(usage | {"body": _sse(base | {"choices": [], "usage": body["usage"]})})
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


def _sse(chunk: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


def _model(model: str) -> Reply:
    """`GET /v1/models/<id>`: a profile with overrides is a model too, though not listed."""
    try:
        known = resolve_profile(model) is not None
    except ConfigError:
        known = False
    if not known:
        message = f"The model `{model}` does not exist."
        return error_reply(404, message, "invalid_request_error", "model_not_found", "model")
    return Reply(200, {"id": model, "object": "model", "created": 0, "owned_by": "sandbox"})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def build_app(
    knowledge: KnowledgeBase | None = None, required_key: str | None = None
) -> SandboxApp:
    return SandboxApp(Sandbox(knowledge), required_key)


def main(argv: Sequence[str] | None = None, prog: str = "python -m canaryflow.sandbox") -> None:
    """`python -m canaryflow.sandbox` and `canaryflow sandbox` (which names itself in `prog`)."""
    parser = argparse.ArgumentParser(prog=prog, description="Serve the sandbox LLM provider.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8400)
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--tls-cert", help="PEM certificate (chain): serve HTTPS")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument(
        "--require-key",
        metavar="ENV_VAR",
        help="answer 401 unless requests carry the key held by this environment variable "
        "(its name, never the key: a command line is visible to every user in `ps`)",
    )
    args = parser.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    required_key = None
    if args.require_key is not None:
        required_key = os.environ.get(args.require_key, "").strip()
        if not required_key:
            sys.exit(f"--require-key: environment variable ${args.require_key} is not set")
    import uvicorn

    def installed(name: str) -> bool:
        return importlib.util.find_spec(name) is not None

    uvicorn.run(
        build_app(required_key=required_key),
        host=args.host,
        port=args.port,
        http="httptools" if installed("httptools") else "h11",
        loop="uvloop" if installed("uvloop") else "asyncio",
        access_log=False,
        log_level=args.log_level,
        server_header=False,
        date_header=False,
        timeout_keep_alive=75,  # as hosted providers do (uvicorn's 5 s would drop warm pools)
        ssl_certfile=args.tls_cert,
        ssl_keyfile=args.tls_key,
    )


if __name__ == "__main__":
    main()
