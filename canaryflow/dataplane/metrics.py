"""Prometheus metrics of one model service, labelled by service, version and role.

The request, latency, token, cost and quality series are the users': a synthetic request (marked
by Envoy's synthetic listener) is counted only in `canaryflow_synthetic_requests_total`, so no
dashboard or alert built on the users' series sees it.

Every app owns its `CollectorRegistry`, so several apps can live in one process (tests). Labelled
children are cached: `.labels()` costs microseconds that the hot path does not need to pay twice.

The request path only notes a request (`observe_request`: one tuple appended); the counters and
the latency histogram take the notes in batches (`flush`): from the record worker after each
batch, and before any read of the registry (a scrape, `get_sample_value`), so a reader never
sees a request missing. A batch adds each series' count, tokens and cost once and each latency
bucket once, where the request path used to take a lock per counter per request.

Beside the canaryflow_* series, the same requests feed the OpenTelemetry GenAI client metrics as
Prometheus names them (`gen_ai_client_token_usage`, `gen_ai_client_operation_duration_seconds`,
with the semantic conventions' advised buckets), so dashboards and PromQL gates written for
those conventions work unchanged. Labels are the conventions' attributes in Prometheus form
(`gen_ai_token_type`, `gen_ai_operation_name`, `gen_ai_request_model`, `error_type`) plus service,
version and role.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Fine enough for a p95 between 5 ms and 10 s (neighbouring bounds at most ~1.5x apart).
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
    0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.5, 10.0,
)  # fmt: skip
FLAGS = ("hallucination", "unsafe", "injection_leak", "refusal")
# Ratings scaled to 0..1: tenths, so a thumbs up/down and a 1-5 star scale both fall on bounds.
FEEDBACK_BUCKETS = (0.0, 0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9, 1.0)
# OpenTelemetry GenAI semantic conventions: the advised bucket boundaries.
GENAI_TOKEN_BUCKETS = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
)  # fmt: skip
GENAI_DURATION_BUCKETS = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)  # fmt: skip
GENAI_OPERATION = "chat"  # the service answers chat completions
MAX_MODEL_CHARS = 128
CONTENT_TYPE = CONTENT_TYPE_LATEST
_BASE = ("service", "version", "role")
_GENAI = (*_BASE, "gen_ai_operation_name", "gen_ai_request_model")
# Direct callers name the version in a header: past this many, new ones count as "other", so a
# client cannot grow the series without bound. A service has a handful of live versions.
MAX_VERSIONS = 64
OTHER = "other"
# Notes held before a flush is forced on the request path (the worker flushes far sooner).
MAX_NOTES = 4096
_Note = tuple[str, str, int, float, int, int, float, bool]


class _FlushFirst:
    """Registered before the series: the registry collects it first, and collecting it applies
    the notes, so every read of the registry sees every request noted so far."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> list[Any]:
        self.metrics.flush()
        return []


class ServiceMetrics:
    """The series the analysis layer queries (names and labels are a contract with it)."""

    def __init__(self, service: str, registry: CollectorRegistry | None = None) -> None:
        self.service = service
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._notes: list[_Note] = []
        r.register(_FlushFirst(self))  # type: ignore[arg-type]  # a collector without series
        self.requests = Counter(
            "canaryflow_requests", "Requests answered, by status", [*_BASE, "status"], registry=r
        )
        self.duration = Histogram(
            "canaryflow_request_duration_seconds",
            "Time from request arrival to response",
            _BASE,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "canaryflow_tokens", "Tokens, by direction", [*_BASE, "direction"], registry=r
        )
        self.cost = Counter("canaryflow_cost_usd", "Provider cost in USD", _BASE, registry=r)
        self.checked = Counter(
            "canaryflow_quality_checked", "Responses the quality checkers ran on", _BASE, registry=r
        )
        self.flags = Counter(
            "canaryflow_quality_flags", "Quality flags raised", [*_BASE, "flag"], registry=r
        )
        self.tool_calls = Counter(
            "canaryflow_tool_calls",
            "Tool calls the provider asked for: executed, skipped (shadow) or failed",
            [*_BASE, "tool", "action"],
            registry=r,
        )
        self.registry_errors = Counter(
            "canaryflow_registry_errors",
            "Failed manifest or alias fetches",
            ["service"],
            registry=r,
        )
        self.records_dropped = Counter(
            "canaryflow_records_dropped",
            "Request records dropped because the record queue was full",
            ["service"],
            registry=r,
        )
        self.checker_items = Counter(
            "canaryflow_checker_items",
            "Answers per live checker and outcome: judged, failed (error, timeout, garbage, no "
            "result in time), dropped (its queue was full), late (a result after its record "
            "was written)",
            ["service", "checker", "outcome"],
            registry=r,
        )
        self.synthetic_requests = Counter(
            "canaryflow_synthetic_requests",
            "Synthetic requests answered (load a release asked for; not in the users' series)",
            [*_BASE, "status"],
            registry=r,
        )
        self.feedback_score = Histogram(
            "canaryflow_feedback_score",
            "Users' ratings of answers (POST /v1/feedback) on 0 (worst) .. 1 (best); a "
            "re-rating counts again here, the store (read by the satisfaction gate) keeps the "
            "latest only",
            _BASE,
            buckets=FEEDBACK_BUCKETS,
            registry=r,
        )
        self.feedback_negative = Counter(
            "canaryflow_feedback_negative",
            "Negative ratings (below the service's negative_below)",
            _BASE,
            registry=r,
        )
        self.feedback_calls = Counter(
            "canaryflow_feedback_calls",
            "Calls to POST /v1/feedback by outcome: rated, rerated, unknown_request, invalid, "
            "too_large, unavailable",
            ["service", "outcome"],
            registry=r,
        )
        self.genai_tokens = Histogram(
            "gen_ai_client_token_usage",
            "Tokens per operation, by gen_ai_token_type (input, output); OpenTelemetry GenAI "
            "gen_ai.client.token.usage",
            [*_GENAI, "gen_ai_token_type"],
            buckets=GENAI_TOKEN_BUCKETS,
            registry=r,
        )
        self.genai_duration = Histogram(
            "gen_ai_client_operation_duration_seconds",
            "Time from request arrival to response, error_type the failed status (empty on "
            "success); OpenTelemetry GenAI gen_ai.client.operation.duration",
            [*_GENAI, "error_type"],
            buckets=GENAI_DURATION_BUCKETS,
            registry=r,
        )
        self._children: dict[tuple[str, ...], _RequestSeries] = {}
        self._versions: set[str] = set()
        self._models: dict[str, str] = {}

    def _bounded(self, version: str) -> str:
        if version in self._versions:
            return version
        if len(self._versions) >= MAX_VERSIONS:
            return OTHER
        self._versions.add(version)
        return version

    def name_model(self, version: str, model: str) -> None:
        """The model `version` asks its provider for (`gen_ai_request_model`); call it when the
        version is loaded: series made before keep the label they were made with."""
        version = self._bounded(version)
        self._models[version] = model[:MAX_MODEL_CHARS]
        for key in [k for k in self._children if k[0] == version]:
            del self._children[key]

    def model_of(self, version: str) -> str:
        return self._models.get(version, "")

    def observe_request(
        self,
        version: str,
        role: str,
        status: int,
        seconds: float,
        tokens_in: int = 0,
        tokens_out: int = 0,
        cost_usd: float = 0.0,
        *,
        synthetic: bool = False,
    ) -> None:
        """Note one answered request (the series take it at the next `flush`)."""
        notes = self._notes
        notes.append((version, role, status, seconds, tokens_in, tokens_out, cost_usd, synthetic))
        if len(notes) >= MAX_NOTES:
            self.flush()

    def flush(self) -> None:
        """Apply the noted requests to the series, each series' sums once per batch."""
        notes, self._notes = self._notes, []
        if not notes:
            return
        batch: dict[_RequestSeries, _Batch] = {}
        for version, role, status, seconds, tokens_in, tokens_out, cost, synthetic in notes:
            if synthetic:
                labels = (self.service, self._bounded(version), role, str(status))
                self.synthetic_requests.labels(*labels).inc()
                continue
            series = self._series(version, role, str(status))
            totals = batch.get(series)
            if totals is None:
                totals = batch[series] = _Batch()
            totals.add(seconds, tokens_in, tokens_out, cost)
        for series, totals in batch.items():
            totals.apply(series)

    def _series(self, version: str, role: str, status: str) -> _RequestSeries:
        key = (version, role, status)
        series = self._children.get(key)
        if series is None:
            version = self._bounded(version)
            key = (version, role, status)
            series = self._children.get(key)
        if series is None:
            series = self._children[key] = _RequestSeries(self, version, role, status)
        return series

    def observe_check(self, version: str, role: str, raised: Iterable[str]) -> None:
        """Count one checked response and each flag it raised (flags from `FLAGS`)."""
        self.flush()  # versions get their series slots in the order requests were answered
        version = self._bounded(version)
        self.checked.labels(self.service, version, role).inc()
        for flag in raised:
            self.flags.labels(self.service, version, role, flag).inc()

    def observe_tool_call(self, version: str, role: str, tool: str, action: str) -> None:
        self.flush()
        version = self._bounded(version)
        self.tool_calls.labels(self.service, version, role, tool, action).inc()

    def observe_feedback(self, version: str, role: str, scaled: float, negative: bool) -> None:
        """One stored rating of a `role` answer of `version`, `scaled` to 0..1."""
        self.flush()
        version = self._bounded(version)
        self.feedback_score.labels(self.service, version, role).observe(scaled)
        series = self.feedback_negative.labels(self.service, version, role)
        if negative:
            series.inc()

    def feedback_call(self, outcome: str) -> None:
        """One call to `/v1/feedback` (`outcome`: one of a fixed few)."""
        self.feedback_calls.labels(self.service, outcome).inc()

    def registry_error(self) -> None:
        self.registry_errors.labels(self.service).inc()

    def observe_checker(self, checker: str, outcome: str) -> None:
        """One live checker's outcome for one answer (`checker`: its label, a configured few)."""
        self.checker_items.labels(self.service, checker, outcome).inc()

    def record_dropped(self) -> None:
        self.records_dropped.labels(self.service).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)  # collecting flushes the notes first


class _Batch:
    """One series' share of a batch of notes."""

    __slots__ = (
        "buckets", "cost", "genai_buckets", "input_buckets", "output_buckets", "requests",
        "seconds", "tokens_in", "tokens_out", "used",
    )  # fmt: skip

    def __init__(self) -> None:
        self.requests, self.seconds, self.tokens_in, self.tokens_out, self.cost = 0, 0.0, 0, 0, 0.0
        self.used = 0  # requests whose provider reported token usage
        self.buckets: dict[int, int] = {}
        self.genai_buckets: dict[int, int] = {}
        self.input_buckets: dict[int, int] = {}
        self.output_buckets: dict[int, int] = {}

    def add(self, seconds: float, tokens_in: int, tokens_out: int, cost: float) -> None:
        self.requests += 1
        self.seconds += seconds
        self.tokens_in += tokens_in
        self.tokens_out += tokens_out
        self.cost += cost
        # The first bound >= seconds, as Histogram.observe picks it (+Inf is the last bound).
        _count(self.buckets, bisect_left(LATENCY_BUCKETS, seconds))
        _count(self.genai_buckets, bisect_left(GENAI_DURATION_BUCKETS, seconds))
        if tokens_in or tokens_out:  # usage reported: the GenAI histogram counts it
            self.used += 1
            _count(self.input_buckets, bisect_left(GENAI_TOKEN_BUCKETS, tokens_in))
            _count(self.output_buckets, bisect_left(GENAI_TOKEN_BUCKETS, tokens_out))

    def apply(self, series: _RequestSeries) -> None:
        series.requests.inc(self.requests)
        _add(series.duration, LATENCY_BUCKETS, self.buckets, self.seconds)
        _add(series.genai_duration, GENAI_DURATION_BUCKETS, self.genai_buckets, self.seconds)
        if self.used:
            _add(series.genai_input, GENAI_TOKEN_BUCKETS, self.input_buckets, self.tokens_in)
            _add(series.genai_output, GENAI_TOKEN_BUCKETS, self.output_buckets, self.tokens_out)
        if self.tokens_in:
            series.tokens_in.inc(self.tokens_in)
        if self.tokens_out:
            series.tokens_out.inc(self.tokens_out)
        if self.cost:
            series.cost.inc(self.cost)


def _count(counts: dict[int, int], bucket: int) -> None:
    counts[bucket] = counts.get(bucket, 0) + 1


def _add(histogram: Any, bounds: tuple[float, ...], counts: dict[int, int], total: float) -> None:
    """A batch's observations into one histogram child: each bucket (by the first bound >= the
    value, as Histogram.observe picks it) and the sum once."""
    buckets = getattr(histogram, "_buckets", None)
    if buckets is None or len(buckets) != len(bounds) + 1:  # not the known layout
        raise RuntimeError("prometheus_client's Histogram changed layout; update metrics.py")
    histogram._sum.inc(total)
    for bucket, count in counts.items():
        buckets[bucket].inc(count)


class _RequestSeries:
    __slots__ = (
        "cost", "duration", "genai_duration", "genai_input", "genai_output", "requests",
        "tokens_in", "tokens_out",
    )  # fmt: skip

    def __init__(self, metrics: ServiceMetrics, version: str, role: str, status: str) -> None:
        base = (metrics.service, version, role)
        self.requests = metrics.requests.labels(*base, status)
        self.duration = metrics.duration.labels(*base)
        self.tokens_in = metrics.tokens.labels(*base, "in")
        self.tokens_out = metrics.tokens.labels(*base, "out")
        self.cost = metrics.cost.labels(*base)
        genai = (*base, GENAI_OPERATION, metrics.model_of(version))
        failed = "" if int(status) < 400 else status
        self.genai_duration = metrics.genai_duration.labels(*genai, failed)
        self.genai_input = metrics.genai_tokens.labels(*genai, "input")
        self.genai_output = metrics.genai_tokens.labels(*genai, "output")
        # Zero-valued series exist from the first request, so PromQL rates never see a gap.
        metrics.checked.labels(*base)
