"""`POST /v1/feedback {"request_id": "...", "score": 4}`: a user's rating of one answer.

The rating is joined to the answer's stored request by its id (the `x-request-id` the answer
came with), so any instance of the service can take it: Envoy sends every rating to the
stable cluster, never mirrored. Rating a request again replaces its score. The score must lie
on the service's scale (the policy's `feedback` checker entry; 0..1 without one) and is stored
with its 0..1 form and negative flag (`ratings.py`), which the `satisfaction` gate reads.

An answer's record reaches the store a moment after the answer (batched, after its live
checks), so an id not found yet is looked up again for up to `wait_s` before the 404, which
says to retry. Nothing a user sent is logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Sequence
from typing import Any, Protocol

from starlette.types import Receive, Scope, Send

from canaryflow.contracts import CheckerConfig, FeedbackChecker, ProbesChecker
from canaryflow.dataplane.envoy_config import FEEDBACK_PATH, MIRROR_HEADER
from canaryflow.dataplane.forwarder import ServiceError
from canaryflow.dataplane.metrics import ServiceMetrics
from canaryflow.dataplane.public import read_body, refuse_too_large
from canaryflow.dataplane.ratings import Rated

__all__ = [
    "FEEDBACK_PATH",
    "FeedbackRoute",
    "feedback_config",
    "parse_feedback",
    "pipeline_checkers",
]

log = logging.getLogger("canaryflow.feedback")

MAX_REQUEST_ID_CHARS = 200
RETRY_AFTER_S = 5
_FIELDS = frozenset({"request_id", "score"})


class RatingStore(Protocol):
    def rate(
        self,
        service: str,
        request_id: str,
        *,
        score: float,
        scaled: float,
        negative: bool,
        at: float,
    ) -> Rated | None: ...


def feedback_config(checkers: Sequence[CheckerConfig]) -> FeedbackChecker:
    """The service's rating scale: its `feedback` checker entry, else 0 (bad) .. 1 (good)."""
    found = [c for c in checkers if isinstance(c, FeedbackChecker)]
    return found[0] if found else FeedbackChecker()


def pipeline_checkers(checkers: Sequence[CheckerConfig]) -> tuple[CheckerConfig, ...]:
    """The checkers that judge answers: a `feedback` entry configures this route instead, and
    a `probes` entry the probes' scoring (`probes.py`)."""
    return tuple(c for c in checkers if not isinstance(c, FeedbackChecker | ProbesChecker))


def _usage(config: FeedbackChecker) -> str:
    return (
        'send a JSON object {"request_id": "<the x-request-id header of the answer>", '
        f'"score": <a number from {config.min_score:g} to {config.max_score:g}>}}'
    )


def parse_feedback(raw: bytes, config: FeedbackChecker) -> tuple[str, float]:
    """(request_id, score) of a body, or a 400 `ServiceError` saying what to send."""
    usage = _usage(config)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ServiceError(400, f"the body is not JSON: {usage}", "invalid_request") from None
    if not isinstance(body, dict):
        raise ServiceError(400, f"the body must be a JSON object: {usage}", "invalid_request")
    extra = sorted(str(k) for k in body if k not in _FIELDS)
    if extra:
        names = ", ".join(name[:40] for name in extra[:5])
        raise ServiceError(
            400,
            f"unknown field(s) {names}: only request_id and score are kept; {usage}",
            "invalid_request",
        )
    request_id, score = body.get("request_id"), body.get("score")
    if not isinstance(request_id, str) or not request_id.strip():
        raise ServiceError(
            400, f"request_id must be a non-empty string: {usage}", "invalid_request"
        )
    if len(request_id) > MAX_REQUEST_ID_CHARS or not request_id.isprintable():
        raise ServiceError(
            400,
            f"request_id must be at most {MAX_REQUEST_ID_CHARS} printable characters: {usage}",
            "invalid_request",
        )
    if isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score):
        raise ServiceError(400, f"score must be a number: {usage}", "invalid_request")
    if not config.min_score <= score <= config.max_score:
        raise ServiceError(
            400,
            f"score {score:g} is outside this service's scale {config.min_score:g} to "
            f"{config.max_score:g}: {usage}",
            "invalid_request",
        )
    return request_id, float(score)


class FeedbackRoute:
    """The ASGI app of `POST /v1/feedback` (mounted on the public listener by `build_app`)."""

    def __init__(
        self,
        service: str,
        store: object | None,
        metrics: ServiceMetrics,
        config: FeedbackChecker,
        max_body_bytes: int,
        *,
        wait_s: float = 1.0,
        poll_s: float = 0.1,
    ) -> None:
        self.service = service
        ratings = getattr(store, "ratings", None)
        self.ratings: RatingStore | None = ratings if hasattr(ratings, "rate") else None
        self.metrics = metrics
        self.config = config
        self.max_body_bytes = max_body_bytes
        self.wait_s, self.poll_s = wait_s, poll_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = await read_body(scope, receive, self.max_body_bytes)
        if raw is None:
            self.metrics.feedback_call("too_large")
            await refuse_too_large(send, self.max_body_bytes)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            status, body = await self.rate(raw, headers)
        except ServiceError as exc:
            out: dict[str, str] = {}
            await _send(send, exc.status, exc.body(out), out)
            return
        await _send(send, status, json.dumps(body).encode(), {})

    async def rate(self, raw: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
        """Status and JSON body of one rating; errors as `ServiceError`."""
        try:
            request_id, score = parse_feedback(raw, self.config)
        except ServiceError:
            self.metrics.feedback_call("invalid")
            raise
        if headers.get(MIRROR_HEADER) == "1":  # Envoy drops a copy's answer; its primary stores
            return 202, {"stored": False, "reason": "a mirrored copy: the primary stores it"}
        if self.ratings is None:
            self.metrics.feedback_call("unavailable")
            raise ServiceError(
                503,
                "this service keeps no request store, so ratings cannot be joined to answers: "
                "start it with a store (canaryflow serve --store URL)",
                "feedback_unavailable",
            )
        scaled = self.config.scaled(score)
        negative = score < self.config.negative_cut
        deadline = time.monotonic() + self.wait_s
        while True:
            rated = await self._store(request_id, score, scaled, negative)
            if rated is not None or time.monotonic() >= deadline:
                break
            await asyncio.sleep(self.poll_s)
        if rated is None:
            self.metrics.feedback_call("unknown_request")
            raise ServiceError(
                404,
                f"no answer with this request_id is stored for service {self.service!r}: send "
                "the x-request-id header of an answer it gave (a shadow's cannot be rated). "
                "An answer is stored a few seconds after it is sent: retry after "
                f"{RETRY_AFTER_S} s",
                "unknown_request",
                retry_after=str(RETRY_AFTER_S),
            )
        self.metrics.feedback_call("rerated" if rated.replaced else "rated")
        if not rated.synthetic:  # synthetic load stays out of the users' series
            self.metrics.observe_feedback(rated.version, rated.role, scaled, negative)
        return 200, {
            "request_id": request_id,
            "score": score,
            "negative": negative,
            "replaced": rated.replaced,
        }

    async def _store(
        self, request_id: str, score: float, scaled: float, negative: bool
    ) -> Rated | None:
        assert self.ratings is not None
        try:
            return await asyncio.to_thread(
                self.ratings.rate,
                self.service,
                request_id,
                score=score,
                scaled=scaled,
                negative=negative,
                at=time.time(),
            )
        except Exception as exc:  # the store's own errors: SQLite, SQLAlchemy, a closed store
            # The type only: a driver's message can quote the statement's parameters.
            log.warning("feedback: the store refused a rating (%s)", type(exc).__name__)
            self.metrics.feedback_call("unavailable")
            raise ServiceError(
                503, "the store did not take the rating: retry shortly", "feedback_unavailable",
                retry_after=str(RETRY_AFTER_S),
            ) from None  # fmt: skip


async def _send(send: Send, status: int, body: bytes, headers: dict[str, str]) -> None:
    raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    raw += [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
