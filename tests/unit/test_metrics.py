"""The model service's metrics: names and labels are a contract with the analysis layer."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Histogram

from canaryflow.dataplane.metrics import MAX_VERSIONS, OTHER, ServiceMetrics


def _versions(metrics: ServiceMetrics) -> set[str]:
    samples = metrics.registry.collect()
    return {
        s.labels["version"]
        for family in samples
        if family.name == "canaryflow_requests"
        for s in family.samples
        if "version" in s.labels
    }


def test_request_series_carry_service_version_role_and_status() -> None:
    metrics = ServiceMetrics("svc", CollectorRegistry())
    metrics.observe_request("3", "canary", 200, 0.05, tokens_in=10, tokens_out=20, cost_usd=0.01)
    value = metrics.registry.get_sample_value(
        "canaryflow_requests_total", {"service": "svc", "version": "3", "role": "canary",
                                      "status": "200"},
    )  # fmt: skip
    assert value == 1.0
    tokens = metrics.registry.get_sample_value(
        "canaryflow_tokens_total",
        {"service": "svc", "version": "3", "role": "canary", "direction": "out"},
    )
    assert tokens == 20.0


def test_versions_named_by_callers_are_bounded() -> None:
    metrics = ServiceMetrics("svc", CollectorRegistry())
    for n in range(MAX_VERSIONS + 50):
        metrics.observe_request(f"v{n}", "stable", 503, 0.001)
    metrics.observe_check("v-late", "stable", ["hallucination"])
    versions = _versions(metrics)
    assert len(versions) == MAX_VERSIONS + 1
    assert OTHER in versions and "v0" in versions and f"v{MAX_VERSIONS + 10}" not in versions
    other = metrics.registry.get_sample_value(
        "canaryflow_requests_total",
        {"service": "svc", "version": OTHER, "role": "stable", "status": "503"},
    )
    assert other == 50.0
    flagged = metrics.registry.get_sample_value(
        "canaryflow_quality_flags_total",
        {"service": "svc", "version": OTHER, "role": "stable", "flag": "hallucination"},
    )
    assert flagged == 1.0


def test_noted_requests_read_as_if_observed_one_by_one() -> None:
    """The request path only notes a request; a batch applies the notes, and any read of the
    registry applies them first: the same counts, sums and buckets as Histogram.observe."""
    from canaryflow.dataplane.metrics import LATENCY_BUCKETS

    metrics = ServiceMetrics("svc", CollectorRegistry())
    expected = CollectorRegistry()
    reference = Histogram("ref", "ref", buckets=LATENCY_BUCKETS, registry=expected)
    latencies = [0.0, 0.001, 0.0010001, 0.0025, 0.03, 2.5, 10.0, 11.0, *LATENCY_BUCKETS]
    for seconds in latencies:
        metrics.observe_request("1", "stable", 200, seconds, tokens_in=2, cost_usd=0.5)
        reference.observe(seconds)
    metrics.observe_request("1", "stable", 200, 0.002, synthetic=True)
    labels = {"service": "svc", "version": "1", "role": "stable"}
    get = metrics.registry.get_sample_value
    assert get("canaryflow_requests_total", {**labels, "status": "200"}) == len(latencies)
    assert get("canaryflow_tokens_total", {**labels, "direction": "in"}) == 2 * len(latencies)
    assert get("canaryflow_cost_usd_total", labels) == 0.5 * len(latencies)
    assert get("canaryflow_synthetic_requests_total", {**labels, "status": "200"}) == 1
    for bound in [*LATENCY_BUCKETS, float("inf")]:
        le = {"le": str(bound) if bound != float("inf") else "+Inf"}
        got = get("canaryflow_request_duration_seconds_bucket", {**labels, **le})
        assert got == expected.get_sample_value("ref_bucket", le), bound
    total = get("canaryflow_request_duration_seconds_sum", labels)
    assert total == pytest.approx(sum(latencies))
    assert b"canaryflow_requests_total" in metrics.exposition()
