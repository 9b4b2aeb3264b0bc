"""Prometheus metrics of one model service, labelled by service, version and role.

The request, latency, token, cost and quality series are the users': a synthetic request (marked
by Envoy's synthetic listener) is counted only in `canaryflow_synthetic_requests_total`, so no
dashboard or alert built on the users' series sees it.

Every app owns its `CollectorRegistry`, so several apps can live in one process (tests). Labelled
children are cached: `.labels()` costs microseconds that the hot path does not need to pay twice.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Fine enough for a p95 between 5 ms and 10 s (neighbouring bounds at most ~1.5x apart).
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
    0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.5, 10.0,
)  # fmt: skip
FLAGS = ("hallucination", "unsafe", "injection_leak", "refusal")
CONTENT_TYPE = CONTENT_TYPE_LATEST
_BASE = ("service", "version", "role")
# Direct callers name the version in a header: past this many, new ones count as "other", so a
# client cannot grow the series without bound. A service has a handful of live versions.
MAX_VERSIONS = 64
OTHER = "other"


class ServiceMetrics:
    """The series the analysis layer queries (names and labels are a contract with it)."""

    def __init__(self, service: str, registry: CollectorRegistry | None = None) -> None:
        self.service = service
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
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
        self.synthetic_requests = Counter(
            "canaryflow_synthetic_requests",
            "Synthetic requests answered (load a release asked for; not in the users' series)",
            [*_BASE, "status"],
            registry=r,
        )
        self._children: dict[tuple[str, ...], _RequestSeries] = {}
        self._versions: set[str] = set()

    def _bounded(self, version: str) -> str:
        if version in self._versions:
            return version
        if len(self._versions) >= MAX_VERSIONS:
            return OTHER
        self._versions.add(version)
        return version

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
        if synthetic:
            self.synthetic_requests.labels(self.service, self._bounded(version), role, status).inc()
            return
        key = (version, role, str(status))
        series = self._children.get(key)
        if series is None:
            version = self._bounded(version)
            key = (version, role, str(status))
            series = self._children.get(key)
        if series is None:
            series = self._children[key] = _RequestSeries(self, version, role, str(status))
        series.requests.inc()
        series.duration.observe(seconds)
        if tokens_in:
            series.tokens_in.inc(tokens_in)
        if tokens_out:
            series.tokens_out.inc(tokens_out)
        if cost_usd:
            series.cost.inc(cost_usd)

    def observe_check(self, version: str, role: str, raised: Iterable[str]) -> None:
        """Count one checked response and each flag it raised (flags from `FLAGS`)."""
        version = self._bounded(version)
        self.checked.labels(self.service, version, role).inc()
        for flag in raised:
            self.flags.labels(self.service, version, role, flag).inc()

    def observe_tool_call(self, version: str, role: str, tool: str, action: str) -> None:
        version = self._bounded(version)
        self.tool_calls.labels(self.service, version, role, tool, action).inc()

    def registry_error(self) -> None:
        self.registry_errors.labels(self.service).inc()

    def record_dropped(self) -> None:
        self.records_dropped.labels(self.service).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _RequestSeries:
    __slots__ = ("cost", "duration", "requests", "tokens_in", "tokens_out")

    def __init__(self, metrics: ServiceMetrics, version: str, role: str, status: str) -> None:
        base = (metrics.service, version, role)
        self.requests = metrics.requests.labels(*base, status)
        self.duration = metrics.duration.labels(*base)
        self.tokens_in = metrics.tokens.labels(*base, "in")
        self.tokens_out = metrics.tokens.labels(*base, "out")
        self.cost = metrics.cost.labels(*base)
        # Zero-valued series exist from the first request, so PromQL rates never see a gap.
        metrics.checked.labels(*base)
