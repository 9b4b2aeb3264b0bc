"""Real Prometheus scraping a real metrics endpoint; PromQL answers checked against the truth."""

from __future__ import annotations

import itertools
import math
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from prometheus_client import start_http_server

from canaryflow.analysis.sources import (
    RECORDING_RULES,
    PrometheusSource,
    PromSummary,
    expressions,
)
from canaryflow.dataplane.metrics import FLAGS, LATENCY_BUCKETS, ServiceMetrics
from canaryflow.errors import StackError
from canaryflow.local.processes import free_port
from canaryflow.local.prometheus import BINARY, INSTALL_HINT, LEVEL_RULES, PrometheusServer
from tests.waiting import wait_for

RULES_DIR = Path(__file__).resolve().parents[2] / "deployments" / "prometheus"
SERVICE = "svc"


def require_installed(path: str) -> None:
    """`.ci/run` and `make test` install Debian's prometheus: missing, it fails, never skips."""
    if not Path(path).is_file():
        pytest.fail(
            f"{path} is missing: run `{INSTALL_HINT}` (or `make prometheus`); "
            "`.ci/run` and `make test` install it"
        )


# (version, role) -> what the app serves during the window
TRUTH = {
    ("1", "stable"): {
        "n": 200,
        "errors": 4,
        "lo_ms": 20.0,
        "hi_ms": 80.0,
        "checked": 50,
        "hallucinations": 0,
        "cost": 0.001,
    },
    ("2", "canary"): {
        "n": 100,
        "errors": 10,
        "lo_ms": 150.0,
        "hi_ms": 350.0,
        "checked": 50,
        "hallucinations": 5,
        "cost": 0.003,
    },
}


@dataclass
class Scraped:
    prometheus: PrometheusServer
    source: PrometheusSource
    start: datetime
    end: datetime
    latencies_ms: dict[tuple[str, str], np.ndarray]
    app_port: int


def serve_requests(metrics: ServiceMetrics) -> dict[tuple[str, str], np.ndarray]:
    """What the model service would record for TRUTH's requests; returns the latencies."""
    rng = np.random.default_rng(8)
    latencies = {}
    for (version, role), t in TRUTH.items():
        values = rng.uniform(t["lo_ms"], t["hi_ms"], t["n"])
        for i, ms in enumerate(values):
            status = 500 if i < t["errors"] else 200
            metrics.observe_request(version, role, status, ms / 1000, 10, 30, t["cost"])
        for i in range(t["checked"]):
            metrics.observe_check(
                version, role, ["hallucination"] if i < t["hallucinations"] else []
            )
        latencies[(version, role)] = values
    return latencies


def prepare_series(metrics: ServiceMetrics) -> None:
    """Zero-valued series before the first scrape, so increase() sees every request."""
    for version, role in TRUTH:
        labels = (SERVICE, version, role)
        for status in ("200", "500"):
            metrics.requests.labels(*labels, status)
        metrics.duration.labels(*labels)
        for direction in ("in", "out"):
            metrics.tokens.labels(*labels, direction)
        metrics.cost.labels(*labels)
        metrics.checked.labels(*labels)
        for flag in FLAGS:
            metrics.flags.labels(*labels, flag)


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scraped]:
    require_installed(BINARY)
    metrics = ServiceMetrics(SERVICE)
    prepare_series(metrics)
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
        latencies = serve_requests(metrics)
        total = sum(t["n"] for t in TRUTH.values())
        query = f'sum(canaryflow_requests_total{{service="{SERVICE}"}})'

        def scraped_total() -> bool:
            rows = source.query(query)
            return bool(rows) and float(rows[0]["value"][1]) == total

        wait_for(f"Prometheus to scrape the {total} served requests", scraped_total, 20, 0.25)
        yield Scraped(prometheus, source, start, datetime.now(UTC), latencies, port)
    finally:
        prometheus.stop()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def bucket_of(value_s: float) -> tuple[float, float]:
    bounds = (0.0, *LATENCY_BUCKETS, math.inf)
    for lo, hi in itertools.pairwise(bounds):
        if lo < value_s <= hi:
            return lo, hi
    raise AssertionError(f"{value_s} is in no bucket")


def summary(scraped: Scraped, version: str, role: str) -> PromSummary:
    return scraped.source.summary(SERVICE, version, role, scraped.start, scraped.end)


@pytest.mark.parametrize("key", list(TRUTH))
def test_p95_matches_the_served_latencies_within_a_bucket(scraped: Scraped, key: tuple) -> None:
    found = summary(scraped, *key)
    true_p95_s = float(np.quantile(scraped.latencies_ms[key], 0.95)) / 1000
    lo, hi = bucket_of(true_p95_s)
    assert 1000 * lo <= found.p95_ms <= 1000 * hi
    assert found.p50_ms < found.p95_ms <= found.p99_ms


@pytest.mark.parametrize("key", list(TRUTH))
def test_rates_match_what_the_app_exported(scraped: Scraped, key: tuple) -> None:
    found, truth = summary(scraped, *key), TRUTH[key]
    assert found.error_rate == pytest.approx(truth["errors"] / truth["n"], rel=1e-9)
    hallucination = found.flag_rate("hallucination")
    assert hallucination == pytest.approx(truth["hallucinations"] / truth["checked"], abs=1e-9)
    assert found.cost_per_1k == pytest.approx(1000 * truth["cost"], rel=1e-6)
    assert found.tokens_per_request == pytest.approx(40.0, rel=1e-9)
    # counts come from increase(), extrapolated to the window's edges: estimates, not integers
    assert found.requests == pytest.approx(truth["n"], rel=0.35)


def test_summaries_list_each_version_and_role(scraped: Scraped) -> None:
    found = scraped.source.summaries(SERVICE, scraped.start, scraped.end)
    assert set(found) == set(TRUTH)
    sample = found[("2", "canary")].role_sample()
    assert sample.checked > 0 and sample.hallucinations / sample.checked == pytest.approx(
        0.1, abs=0.02
    )


def test_absent_version_gives_an_empty_summary(scraped: Scraped) -> None:
    found = summary(scraped, "9", "canary")
    assert found.requests == 0.0 and math.isnan(found.p95_ms) and math.isnan(found.error_rate)


def test_series_present_only_for_exported_services(scraped: Scraped) -> None:
    assert scraped.source.series_present(SERVICE)
    assert not scraped.source.series_present("no-such-service")


def test_recording_rules_are_loaded_and_evaluated(scraped: Scraped) -> None:
    rules = httpx.get(f"{scraped.prometheus.url}/api/v1/rules", timeout=5).json()["data"]
    names = {rule["name"] for group in rules["groups"] for rule in group["rules"]}
    assert names == set(RECORDING_RULES) | set(LEVEL_RULES)  # LEVEL_RULES: test_promql_live
    # Evaluated on the scraped series: the error ratio is the one each (version, role) served.
    query = f'canaryflow:error_ratio:rate1m{{service="{SERVICE}"}}'

    def ratios() -> dict[tuple[str, str], float]:
        rows = scraped.source.query(query)
        found = {(r["metric"]["version"], r["metric"]["role"]): float(r["value"][1]) for r in rows}
        return found if set(found) == set(TRUTH) else {}

    found = wait_for("the recording rules' first evaluation", ratios, 20, 0.25)
    for key, truth in TRUTH.items():
        assert found[key] == pytest.approx(truth["errors"] / truth["n"], rel=1e-6), key


def test_reload_adds_a_scrape_job(scraped: Scraped) -> None:
    prometheus = scraped.prometheus
    before = dict(prometheus.targets)
    app = f"127.0.0.1:{scraped.app_port}"

    def jobs() -> list[str]:
        config = yaml.safe_load(prometheus.config_path.read_text())
        return sorted(c["job_name"] for c in config["scrape_configs"])

    def up(job: str) -> bool:
        return bool(scraped.source.query(f'up{{job="{job}", instance="{app}"}} == 1'))

    try:
        prometheus.reload({**before, "again": [app]})
        prometheus.wait_for_targets(timeout_s=20)
        assert jobs() == ["again", "model"]
        assert up("again") and up("model")
    finally:
        # The other tests share this server: leave it scraping what it scraped before.
        prometheus.reload(before)
    assert jobs() == ["model"]


def test_a_bad_promql_is_a_stack_error_naming_the_query(scraped: Scraped) -> None:
    with pytest.raises(StackError, match="sum by"):
        scraped.source.query("sum by (")


def test_missing_binary_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(StackError, match="apt-get install -y --no-install-recommends prometheus"):
        PrometheusServer(tmp_path, binary=str(tmp_path / "prometheus")).start()


def test_rules_file_records_exactly_the_source_expressions() -> None:
    doc = yaml.safe_load((RULES_DIR / "rules.yml").read_text())
    recorded = {r["record"]: " ".join(r["expr"].split()) for r in doc["groups"][0]["rules"]}
    rendered = expressions(fn="rate", window="1m")
    assert recorded == {name: rendered[key] for name, key in RECORDING_RULES.items()}


def test_promtool_rules_test_passes() -> None:
    promtool = shutil.which("promtool") or "/usr/bin/promtool"
    require_installed(promtool)  # Debian's prometheus package ships promtool
    done = subprocess.run(
        [promtool, "test", "rules", "rules_test.yml"],
        cwd=RULES_DIR,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout
