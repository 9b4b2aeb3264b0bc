"""The model service's metrics: names and labels are a contract with the analysis layer."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

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
