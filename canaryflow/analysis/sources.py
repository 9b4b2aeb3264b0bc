"""Where a window's numbers come from: the request store (per request) or Prometheus (counters).

Fetching only; judging is elsewhere. The store gives what the judges need in full (raw latencies,
per-request cost, quality flags), so `StoreSource` builds the `WindowSample` the gates take.
Prometheus gives counters and histogram buckets: `PrometheusSource` answers dashboards'
questions (p95 from buckets, rates, cost per 1k) and whether the series exist at all, and the
same expressions, at `[1m]`, are the recording rules in deployments/prometheus/rules.yml.
`PrometheusSource.instant` fetches one value per query for the PromQL gates (`analysis.promql`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import cached_property
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable
from urllib.parse import urlsplit

import httpx

from canaryflow.analysis.probes import pooled_probes
from canaryflow.analysis.promql import Fetched
from canaryflow.analysis.samples import RoleSample, WindowSample
from canaryflow.contracts import RequestRecord, Role
from canaryflow.errors import StackError

if TYPE_CHECKING:
    from prometheus_api_client import PrometheusConnect

BY = "service, version, role"
QUANTILES = {"p50_ms": 0.5, "p95_ms": 0.95, "p99_ms": 0.99}
# recording rule name -> expression key in `expressions`
RECORDING_RULES = {
    "canaryflow:requests:rate1m": "requests",
    "canaryflow:error_ratio:rate1m": "error_ratio",
    "canaryflow:request_duration_seconds:p50_1m": "p50_ms",
    "canaryflow:request_duration_seconds:p95_1m": "p95_ms",
    "canaryflow:request_duration_seconds:p99_1m": "p99_ms",
    "canaryflow:tokens_per_request:rate1m": "tokens_per_request",
    "canaryflow:cost_per_1k_requests:rate1m": "cost_per_1k",
    "canaryflow:quality_flag_ratio:rate1m": "flag_ratio",
}


class RecordStore(Protocol):
    def records(
        self,
        service: str,
        since: datetime,
        until: datetime,
        *,
        role: Role | None = None,
        version: str | None = None,
        synthetic: bool | None = False,
    ) -> list[RequestRecord]: ...


class Rating(Protocol):
    """One user rating: on 0 (worst) .. 1 (best), and whether it was negative."""

    @property
    def scaled(self) -> float: ...
    @property
    def negative(self) -> bool: ...


@runtime_checkable
class RatingReader(Protocol):
    """The store's ratings (`canaryflow.dataplane.ratings.Ratings`)."""

    def window(
        self, service: str, role: Role | str, version: str, since: float, until: float
    ) -> Sequence[Rating]: ...


class StoreSource:
    """Windows from the paired request store (`canaryflow.dataplane.store.Store`)."""

    def __init__(self, store: RecordStore) -> None:
        self.store = store

    def window(
        self,
        service: str,
        baseline_version: str,
        candidate_version: str,
        start: datetime,
        end: datetime,
        *,
        candidate_role: Role | str = Role.CANARY,
    ) -> WindowSample:
        """Stable baseline vs the candidate's canary (or shadow) requests in [start, end).

        Users' requests only: synthetic load (Envoy's synthetic listener) is never a sample, so
        a window that had only synthetic requests has no data, which no gate passes. Users'
        ratings (`/v1/feedback`) of the window's answers come along when the store keeps them,
        and the probes' counts, pooled since the stage began (`analysis.probes`).
        """
        role = Role(candidate_role)
        if role is Role.STABLE:
            raise ValueError("the candidate is judged as canary or shadow, not stable")
        baseline = self.store.records(
            service, start, end, role=Role.STABLE, version=baseline_version, synthetic=False
        )
        candidate = self.store.records(
            service, start, end, role=role, version=candidate_version, synthetic=False
        )
        probes = pooled_probes(self.store, service, baseline_version, candidate_version, role,
                               start, end)  # fmt: skip
        return WindowSample(
            baseline=replace(self._rated(
                RoleSample.from_records(baseline), service, Role.STABLE, baseline_version,
                start, end,
            ), **probes[0]),
            candidate=replace(self._rated(
                RoleSample.from_records(candidate), service, role, candidate_version, start, end
            ), **probes[1]),
            start=start,
            end=end,
            candidate_role=role.value,
        )  # fmt: skip

    def _rated(
        self,
        sample: RoleSample,
        service: str,
        role: Role,
        version: str,
        start: datetime,
        end: datetime,
    ) -> RoleSample:
        """`sample` with the ratings of its answers, if the store keeps ratings."""
        reader = getattr(self.store, "ratings", None)
        if not isinstance(reader, RatingReader):
            return sample
        found = reader.window(service, role, version, _epoch(start), _epoch(end))
        return replace(
            sample,
            ratings=tuple(r.scaled for r in found),
            negative_ratings=sum(r.negative for r in found),
        )


def _epoch(moment: datetime) -> float:
    """Naive datetimes are UTC, as the store takes them."""
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


# --------------------------------------------------------------------------- Prometheus


def _matchers(*parts: str) -> str:
    given = [p for p in parts if p]
    return "{" + ",".join(given) + "}" if given else ""


def expressions(selector: str = "", window: str = "1m", fn: str = "increase") -> dict[str, str]:
    """PromQL by name; `selector` is a label matcher list without braces, e.g. service="x".

    With fn="increase" the counts are per window (what the source reads); with fn="rate" and
    window "1m" they are the recording rules.
    """

    def total(metric: str, *extra: str, by: str = BY) -> str:
        return f"sum by ({by}) ({fn}({metric}{_matchers(selector, *extra)}[{window}]))"

    requests = total("canaryflow_requests_total")
    errors = total("canaryflow_requests_total", 'status=~"5..|429|408"')
    tokens = total("canaryflow_tokens_total", by=f"{BY}, direction")
    cost = total("canaryflow_cost_usd_total")
    checked = total("canaryflow_quality_checked_total")
    flags = total("canaryflow_quality_flags_total", by=f"{BY}, flag")
    buckets = total("canaryflow_request_duration_seconds_bucket", by=f"{BY}, le")
    found = {
        "requests": requests,
        "errors": errors,
        "error_ratio": f"{errors} / {requests}",
        "tokens": tokens,
        "tokens_per_request": f"{tokens} / ignoring (direction) group_left {requests}",
        "cost": cost,
        "cost_per_1k": f"1000 * {cost} / {requests}",
        "checked": checked,
        "flags": flags,
        "flag_ratio": f"{flags} / ignoring (flag) group_left {checked}",
    }
    for name, q in QUANTILES.items():
        found[name] = f"histogram_quantile({q}, {buckets})"
    return found


@dataclass(frozen=True)
class PromSummary:
    """One version and role over a window, as Prometheus saw it.

    Counts come from `increase()`, which extrapolates to the window's edges: they are estimates
    (not integers), while ratios and quantiles are exact up to histogram bucket resolution.
    """

    version: str
    role: str
    requests: float = 0.0
    errors: float = 0.0
    p50_ms: float = math.nan
    p95_ms: float = math.nan
    p99_ms: float = math.nan
    tokens_in: float = 0.0
    tokens_out: float = 0.0
    cost_usd: float = 0.0
    checked: float = 0.0
    flags: dict[str, float] = field(default_factory=dict)

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else math.nan

    @property
    def tokens_per_request(self) -> float:
        return (self.tokens_in + self.tokens_out) / self.requests if self.requests else math.nan

    @property
    def cost_per_1k(self) -> float:
        return 1000.0 * self.cost_usd / self.requests if self.requests else math.nan

    def flag_rate(self, flag: str) -> float:
        return self.flags.get(flag, 0.0) / self.checked if self.checked else math.nan

    def role_sample(self) -> RoleSample:
        """Counts rounded for the rate and cost judges; no latencies (those need the store)."""
        n = round(self.requests)
        checked = min(n, round(self.checked))

        def flag(name: str) -> int:
            return min(checked, round(self.flags.get(name, 0.0)))

        return RoleSample(
            n=n,
            errors=min(n, round(self.errors)),
            tokens_in=round(self.tokens_in),
            tokens_out=round(self.tokens_out),
            cost_usd=self.cost_usd,
            checked=checked,
            hallucinations=flag("hallucination"),
            unsafe=flag("unsafe"),
            injection_leaks=flag("injection_leak"),
            refusals=flag("refusal"),
        )


MAX_ANSWER_BYTES = 1 << 20  # an instant query's answer; a gate needs one number


def public_url(url: str) -> str:
    """`url` without credentials or query string: safe to show in a verdict."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}{parts.path}"


def instant_value(promql: str, status: int, body: bytes) -> Fetched:
    """One number from Prometheus' answer to an instant query, or why there is none."""
    try:
        answer: Any = json.loads(body)
    except ValueError:
        return Fetched(promql, problem=f"Prometheus answered HTTP {status} without JSON")
    if not isinstance(answer, dict) or answer.get("status") != "success":
        answer = answer if isinstance(answer, dict) else {}
        kind, error = str(answer.get("errorType") or status), str(answer.get("error", ""))
        return Fetched(promql, problem=f"query error ({kind}): {error[:300]}")
    data = answer.get("data")
    shape: Any = data.get("resultType") if isinstance(data, dict) else None
    result: Any = data.get("result") if isinstance(data, dict) else None
    try:
        if shape == "scalar":
            return Fetched(promql, value=float(result[1]))
        if shape != "vector" or not isinstance(result, list):
            return Fetched(promql, problem=f"a {shape} result: a gate needs one number")
        if not result:
            return Fetched(promql, problem="empty result: no series matched at the window's end")
        if len(result) > 1:
            return Fetched(
                promql,
                problem=f"{len(result)} series: aggregate the query to one (e.g. sum(...))",
            )
        return Fetched(promql, value=float(result[0]["value"][1]))
    except (TypeError, ValueError, KeyError, IndexError) as exc:
        return Fetched(promql, problem=f"an answer not in Prometheus' format: {exc!r}"[:300])


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


class PrometheusSource:
    """PromQL over the model services' series (prometheus-api-client)."""

    def __init__(self, url: str, timeout_s: float = 10.0) -> None:
        self.url = url
        self.timeout_s = timeout_s

    @cached_property
    def _client(self) -> PrometheusConnect:
        """Made on first use: the PromQL gates' `instant` needs none."""
        from prometheus_api_client import PrometheusConnect

        return PrometheusConnect(url=self.url, disable_ssl=True)

    def query(self, promql: str, at: datetime | None = None) -> list[dict[str, Any]]:
        params = {"time": str(at.timestamp())} if at is not None else None
        try:
            result = self._client.custom_query(promql, params=params, timeout=self.timeout_s)
        except Exception as exc:  # the client raises requests' and its own errors
            raise StackError(f"Prometheus at {self.url} did not answer {promql!r}: {exc}") from exc
        return list(result)

    def instant(self, promql: str, at: datetime) -> Fetched:
        """`promql`'s one value at `at` (PromQL gates); a failure comes back as the problem."""
        where = public_url(self.url)
        form = {"query": promql, "time": f"{at.timestamp():.3f}", "timeout": f"{self.timeout_s:g}s"}
        try:
            with httpx.stream(
                "POST", f"{self.url.rstrip('/')}/api/v1/query", data=form,
                timeout=self.timeout_s + 1.0,
            ) as response:  # fmt: skip
                body = b""
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > MAX_ANSWER_BYTES:
                        return Fetched(promql, problem=f"answer over {MAX_ANSWER_BYTES} bytes")
        except httpx.TimeoutException:
            return Fetched(
                promql, problem=f"Prometheus at {where}: timed out ({self.timeout_s:g} s)"
            )
        except httpx.HTTPError as exc:
            return Fetched(
                promql, problem=f"Prometheus at {where} unreachable: {type(exc).__name__}: {exc}"
            )
        return instant_value(promql, response.status_code, body)

    def series_present(self, service: str) -> bool:
        """Does any model service of `service` export request counts? (observability gate)"""
        promql = f'count(canaryflow_requests_total{{service="{_escape(service)}"}})'
        return bool(self.query(promql))

    def summaries(
        self, service: str, start: datetime, end: datetime
    ) -> dict[tuple[str, str], PromSummary]:
        """Every (version, role) of `service` that served requests in [start, end]."""
        seconds = max(1, round((end - start).total_seconds()))
        exprs = expressions(f'service="{_escape(service)}"', f"{seconds}s")
        values: dict[tuple[str, str], dict[str, Any]] = {}

        def collect(
            name: str, split: str | None = None, into: str | None = None, scale: float = 1.0
        ) -> None:
            for row in self.query(exprs[name], at=end):
                labels = row["metric"]
                key = (labels.get("version", ""), labels.get("role", ""))
                value = scale * float(row["value"][1])
                if math.isnan(value):
                    continue
                entry = values.setdefault(key, {"flags": {}})
                if split is None:
                    entry[into or name] = value
                elif split == "direction":
                    entry[f"tokens_{labels.get('direction', '')}"] = value
                else:
                    entry["flags"][labels.get("flag", "")] = value

        for name in ("requests", "errors", "checked"):
            collect(name)
        for name in QUANTILES:
            collect(name, scale=1000.0)  # histogram buckets are in seconds
        collect("cost", into="cost_usd")
        collect("tokens", split="direction")
        collect("flags", split="flag")
        return {
            (version, role): PromSummary(
                version=version,
                role=role,
                **{k: v for k, v in entry.items() if k in PromSummary.__dataclass_fields__},
            )
            for (version, role), entry in values.items()
            if entry.get("requests", 0.0) > 0.0
        }

    def summary(
        self, service: str, version: str, role: Role | str, start: datetime, end: datetime
    ) -> PromSummary:
        """One version and role; all zeros (and NaN quantiles) when it served nothing."""
        found = self.summaries(service, start, end)
        return found.get((version, str(role)), PromSummary(version=version, role=str(role)))
