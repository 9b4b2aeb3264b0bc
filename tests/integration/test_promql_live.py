"""PromQL gates against a real Prometheus scraping a real metrics endpoint.

The model service's `ServiceMetrics` serves known requests (the same as test_prometheus.py's),
Debian's Prometheus scrapes them with the shipped recording rules, and policies' PromQL gates are
judged through `judge_sample` the way a release window is: passing and failing on the scraped
numbers, and NODATA (never a pass) when Prometheus is down, slow, or refuses the query.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import start_http_server

from canaryflow.analysis.gates import judge_sample
from canaryflow.analysis.promql import prometheus_target
from canaryflow.analysis.samples import RoleSample, WindowSample
from canaryflow.analysis.sources import PrometheusSource
from canaryflow.contracts import GatePolicy, GateResult, Label, Severity
from canaryflow.contracts.policy import PromQLGateSpec
from canaryflow.dataplane.metrics import ServiceMetrics
from canaryflow.local.processes import free_port
from canaryflow.local.prometheus import BINARY, LEVEL_RULES, PrometheusServer
from tests.integration.test_prometheus import (
    SERVICE,
    TRUTH,
    prepare_series,
    require_installed,
    serve_requests,
)
from tests.waiting import wait_for

RULES = Path(__file__).resolve().parents[2] / "deployments" / "prometheus" / "rules.yml"
SELECT = 'service="{{service}}",version="{{version}}",role="{{role}}"'
ERROR_RATIO = (
    f'sum(increase(canaryflow_requests_total{{{SELECT},status=~"5.."}}[{{{{window}}}}])) '
    f"/ sum(increase(canaryflow_requests_total{{{SELECT}}}[{{{{window}}}}]))"
)
GENAI_P95 = (
    "histogram_quantile(0.95, sum by (le) "
    f"(rate(gen_ai_client_operation_duration_seconds_bucket{{{SELECT}}}[{{{{window}}}}])))"
)
MODELS = {"1": "sandbox-small", "2": "sandbox-large"}


@dataclass
class Scraped:
    url: str
    start: datetime
    end: datetime


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scraped]:
    require_installed(BINARY)
    metrics = ServiceMetrics(SERVICE)
    for version, model in MODELS.items():
        metrics.name_model(version, model)
    prepare_series(metrics)
    for version, role in TRUTH:  # the GenAI series exist, at zero, before the first scrape
        for status in ("200", "500"):
            metrics._series(version, role, status)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=metrics.registry)
    prometheus = PrometheusServer(
        tmp_path_factory.mktemp("prometheus"), targets={"model": [f"127.0.0.1:{port}"]}
    )
    try:
        prometheus.start()
        prometheus.wait_for_targets(timeout_s=30)
        source = PrometheusSource(prometheus.url)
        start = datetime.now(UTC) - timedelta(seconds=3)
        serve_requests(metrics)
        total = sum(t["n"] for t in TRUTH.values())
        query = f'sum(gen_ai_client_operation_duration_seconds_count{{service="{SERVICE}"}})'

        def scraped_total() -> bool:
            rows = source.query(query)
            return bool(rows) and float(rows[0]["value"][1]) == total

        wait_for(f"Prometheus to scrape the {total} served requests", scraped_total, 20, 0.25)
        yield Scraped(prometheus.url, start, datetime.now(UTC))
    finally:
        prometheus.stop()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def gate(query: str = ERROR_RATIO, **bounds: Any) -> PromQLGateSpec:
    return PromQLGateSpec.model_validate(
        {"name": "g", "query": query, "severity": "hard", **bounds}
    )


def judge(
    scraped: Scraped, spec: PromQLGateSpec, *, url: str | None = None, service: str = SERVICE
) -> GateResult:
    """The gate judged as a release window judges it: `judge_sample` with the stack's URL."""
    role = RoleSample(n=100)
    sample = WindowSample(role, role, start=scraped.start, end=scraped.end,
                          candidate_role="canary")  # fmt: skip
    target = prometheus_target(url or scraped.url, service, "1", "2")
    results, _, _ = judge_sample(GatePolicy(promql=(spec,)), sample, promql=target)
    assert results[-1].gate == "promql:g"
    return results[-1]


def test_a_threshold_gate_passes_and_fails_on_the_scraped_error_ratio(scraped: Scraped) -> None:
    truth = TRUTH[("2", "canary")]
    passed = judge(scraped, gate(max=0.2))
    assert passed.label is Label.PASS, passed.reason
    assert passed.evidence.candidate == pytest.approx(truth["errors"] / truth["n"], rel=1e-6)
    assert 'version="2",role="canary"' in str(passed.evidence.detail["query"])
    failed = judge(scraped, gate(max=0.05))
    assert failed.label is Label.FAIL and "above max 0.05" in failed.reason


def test_a_ratio_gate_compares_with_stable(scraped: Scraped) -> None:
    stable, canary = TRUTH[("1", "stable")], TRUTH[("2", "canary")]
    ratio = (canary["errors"] / canary["n"]) / (stable["errors"] / stable["n"])
    failed = judge(scraped, gate(max_ratio=2.0))
    assert failed.label is Label.FAIL and failed.evidence.estimate == pytest.approx(ratio)
    assert judge(scraped, gate(max_ratio=ratio + 0.5)).label is Label.PASS
    # The GenAI duration histogram: canary answers in 150-350 ms, stable in 20-80 ms.
    slower = judge(scraped, gate(GENAI_P95, max_ratio=1.25))
    assert slower.label is Label.FAIL and slower.evidence.estimate > 2.0


def test_prometheus_down_is_nodata(scraped: Scraped) -> None:
    result = judge(scraped, gate(max=0.2), url=f"http://127.0.0.1:{free_port()}")
    assert result.label is Label.NODATA and result.severity is Severity.OBSERVABILITY
    assert "unreachable" in result.reason


def test_a_prometheus_that_never_answers_is_nodata_after_the_timeout(scraped: Scraped) -> None:
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        source = PrometheusSource(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout_s=0.5)
        fetched = source.instant("up", scraped.end)
    assert fetched.value is None and "timed out" in (fetched.problem or "")


def test_a_query_error_is_nodata_with_prometheus_reason(scraped: Scraped) -> None:
    broken = f"sum by (le (rate(canaryflow_requests_total{{{SELECT}}}[{{{{window}}}}]))"
    result = judge(scraped, gate(broken, max=1.0))
    assert result.label is Label.NODATA and "query error (bad_data)" in result.reason
    assert "parse error" in result.reason


def test_an_empty_result_is_nodata(scraped: Scraped) -> None:
    target = prometheus_target(scraped.url, SERVICE, "1", "9")  # version 9 served nothing
    role = RoleSample(n=100)
    sample = WindowSample(role, role, start=scraped.start, end=scraped.end)
    results, _, _ = judge_sample(GatePolicy(promql=(gate(max=0.2),)), sample, promql=target)
    assert results[-1].label is Label.NODATA and "empty result" in results[-1].reason


def test_a_hostile_service_name_selects_nothing_instead_of_changing_the_query(
    scraped: Scraped,
) -> None:
    hostile = f'{SERVICE}"}} or vector(0) #'
    result = judge(scraped, gate('sum(canaryflow_requests_total{service="{{service}}"})', max=1),
                   service=hostile)  # fmt: skip
    assert result.label is Label.NODATA and "empty result" in result.reason


def test_genai_series_carry_the_conventions_labels(scraped: Scraped) -> None:
    source = PrometheusSource(scraped.url)
    rows = source.query(f'gen_ai_client_token_usage_count{{service="{SERVICE}"}}')
    found = {
        (r["metric"]["version"], r["metric"]["role"], r["metric"]["gen_ai_token_type"]): r
        for r in rows
    }
    assert set(found) == {(v, role, t) for v, role in TRUTH for t in ("input", "output")}
    for (version, role, _), row in found.items():
        assert row["metric"]["gen_ai_request_model"] == MODELS[version]
        assert row["metric"]["gen_ai_operation_name"] == "chat"
        assert float(row["value"][1]) == TRUTH[(version, role)]["n"]
    out = source.query(
        f'gen_ai_client_token_usage_sum{{service="{SERVICE}",version="2",'
        'gen_ai_token_type="output"}'
    )
    assert float(out[0]["value"][1]) == 30 * TRUTH[("2", "canary")]["n"]
    failed = source.query(
        f'gen_ai_client_operation_duration_seconds_count{{service="{SERVICE}",error_type="500"}}'
    )
    assert {r["metric"]["version"]: float(r["value"][1]) for r in failed} == {
        v: t["errors"] for (v, _), t in TRUTH.items()
    }


def test_level_rules_are_loaded_and_evaluated(scraped: Scraped) -> None:
    doc = yaml.safe_load(RULES.read_text())
    group = next(g for g in doc["groups"] if g["name"] == "canaryflow-levels")
    recorded = {r["record"]: " ".join(r["expr"].split()) for r in group["rules"]}
    assert recorded == {k: " ".join(v.split()) for k, v in LEVEL_RULES.items()}
    assert all(len(name.split(":")) == 3 for name in recorded)  # level:metric:operations
    loaded = httpx.get(f"{scraped.url}/api/v1/rules", timeout=5).json()["data"]["groups"]
    names = {r["name"] for g in loaded for r in g["rules"]}
    assert set(LEVEL_RULES) <= names
    query = (
        "service_version_role_gen_ai_token_type:gen_ai_client_token_usage_per_operation:"
        f'ratio_rate1m{{service="{SERVICE}",gen_ai_token_type="output"}}'
    )
    source = PrometheusSource(scraped.url)

    def per_operation() -> dict[str, float]:
        rows = source.query(query)
        found = {r["metric"]["version"]: float(r["value"][1]) for r in rows}
        return found if set(found) == {v for v, _ in TRUTH} else {}

    assert wait_for("the level rules' evaluation", per_operation, 20, 0.25) == {
        "1": pytest.approx(30.0),
        "2": pytest.approx(30.0),
    }
