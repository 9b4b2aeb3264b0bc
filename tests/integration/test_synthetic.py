"""Synthetic load is stored, marked, and never counted by a gate.

A real model service (uvicorn) over a real sandbox provider and a real SQLite store: requests
carrying `x-canaryflow-synthetic: 1` (what Envoy's synthetic listener sets, and its public
listener strips; the edge itself is tested in tests/e2e/test_synthetic_load.py) are stored with
`synthetic` set, left out of every store read the gates make and out of the users' Prometheus
series. The store's migration runs on SQLite and PostgreSQL: a store made before the column
existed gets it on open.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from canaryflow.analysis.gates import judge_sample
from canaryflow.analysis.sources import StoreSource
from canaryflow.contracts import Decision, Label, RequestRecord, Role
from canaryflow.dataplane.resolver import CachedResolver
from canaryflow.dataplane.service import ServiceConfig, build_app
from canaryflow.dataplane.store import COLUMNS, TABLE, Store, row_of
from canaryflow.loading import load_policy
from tests.integration.test_service import SERVICE, Registry, ServiceUnderTest, running, sandbox
from tests.waiting import wait_for

__all__ = ["sandbox"]  # the provider fixture, shared with test_service

REPO = Path(__file__).resolve().parents[2]
POLICY = load_policy(REPO / "deployments" / "policies" / "default.yaml")
SYNTHETIC = {"x-canaryflow-synthetic": "1"}
T0 = datetime(2026, 1, 12, 9, 0, tzinfo=UTC)
METRICS = CollectorRegistry()  # the service's own registry, read in-process


def metric(name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    return sum(
        sample.value
        for family in METRICS.collect()
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


@pytest.fixture(scope="module")
def service(sandbox: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceUnderTest]:
    store = Store(str(tmp_path_factory.mktemp("store") / "records.db"))
    config = ServiceConfig(
        service=SERVICE,
        provider_urls={"sandbox": sandbox},
        default_version="1",
        # Every answer judged: the gates need 30 per role from these few requests.
        checkers=tuple(
            c.model_copy(update={"sample_rate": 1.0, "candidate_sample_rate": 1.0})
            for c in POLICY.checkers
        ),
        flush_every_s=0.05,
    )
    registry = Registry()
    resolver = CachedResolver(registry.fetch, ttl_s=60, retry_s=0.05)
    with running(build_app(config, resolver=resolver, store=store, registry=METRICS)) as url:
        yield ServiceUnderTest(url, registry, store)
    store.close()


def send(service: ServiceUnderTest, n: int, role: str, version: str, synthetic: bool) -> None:
    headers = {"x-canaryflow-role": role, "x-canaryflow-version": version}
    for i in range(n):
        extra = SYNTHETIC if synthetic else {}
        r = service.chat(f"What is the capital of France? ({i})", {**headers, **extra})
        assert r.status_code == 200, r.text


def stored(service: ServiceUnderTest, since: datetime, n: int) -> int | None:
    """Every record since `since`, synthetic or not, once `n` of them are in the store."""
    count = service.store.count(SERVICE, since, datetime.now(UTC), synthetic=None)
    return count if count >= n else None


def test_a_window_of_synthetic_requests_only_has_no_data_for_the_gates(
    service: ServiceUnderTest,
) -> None:
    """Synthetic stable and canary requests, the canary a hallucinating version: counted, the
    window would fail; not counted, it has no data, which is INCONCLUSIVE (never a pass)."""
    before = metric("canaryflow_requests_total", version="3")
    start = datetime.now(UTC) - timedelta(milliseconds=1)
    send(service, 40, "stable", "1", synthetic=True)
    send(service, 40, "canary", "3", synthetic=True)  # version 3 always hallucinates
    wait_for("80 synthetic records in the store", lambda: stored(service, start, 80), 10, 0.05)
    end = datetime.now(UTC)

    sample = StoreSource(service.store).window(SERVICE, "1", "3", start, end)
    results, decision, _ = judge_sample(POLICY, sample)

    print(f"FIGURE synthetic-only window: 80 stored, "
          f"{sample.baseline.n + sample.candidate.n} counted by the gates")  # fmt: skip
    assert (sample.baseline.n, sample.candidate.n) == (0, 0)
    assert results[0].gate == "observability" and results[0].label is Label.NODATA
    assert decision is Decision.INCONCLUSIVE
    assert service.store.count(SERVICE, start, end, synthetic=True) == 80
    # Nor in the users' Prometheus series: only in the synthetic counter.
    assert metric("canaryflow_requests_total", version="3") == before
    assert metric("canaryflow_quality_checked_total", version="3") == 0
    assert metric("canaryflow_synthetic_requests_total", version="3", role="canary") >= 40


def test_users_in_the_same_window_are_counted_and_synthetic_requests_are_not(
    service: ServiceUnderTest,
) -> None:
    start = datetime.now(UTC) - timedelta(milliseconds=1)
    for _ in range(2):  # interleaved: users and synthetic load in the same window
        send(service, 20, "stable", "1", synthetic=False)
        send(service, 30, "stable", "1", synthetic=True)
        send(service, 20, "canary", "2", synthetic=False)
        send(service, 30, "canary", "2", synthetic=True)
    wait_for("200 records in the store", lambda: stored(service, start, 200), 10, 0.05)
    end = datetime.now(UTC)

    sample = StoreSource(service.store).window(SERVICE, "1", "2", start, end)
    results, decision, _ = judge_sample(POLICY, sample)

    print(f"FIGURE mixed window: 80 user + 120 synthetic stored, "
          f"{sample.baseline.n + sample.candidate.n} counted by the gates")  # fmt: skip
    assert (sample.baseline.n, sample.candidate.n) == (40, 40)
    assert results[0].label is Label.PASS, results[0].reason
    assert decision is not Decision.INCONCLUSIVE
    users = service.store.records(SERVICE, start, end)
    assert len(users) == 80 and not any(r.synthetic for r in users)
    assert len(service.store.pairs(SERVICE, start, end)) == 0  # no mirror here: nothing paired
    assert service.store.count(SERVICE, start, end, synthetic=True) == 120


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_store_made_before_the_synthetic_column_gets_it_on_open(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = (
        f"sqlite:///{tmp_path / 'old.db'}"
        if backend == "sqlite"
        else str(request.getfixturevalue("postgres_url"))
    )
    salt_path = tmp_path / "user-salt"
    service = f"svc-{uuid.uuid4().hex[:8]}"
    old = RequestRecord(request_id="old-1", at=T0, service=service, version="1",
                        role=Role.STABLE, status=200, latency_ms=12.0)  # fmt: skip
    with Store(url, salt_path=salt_path) as store:  # made the old way: no synthetic column
        store._backend.create_schema((f"ALTER TABLE {TABLE} DROP COLUMN synthetic",))
        columns = [c for c in COLUMNS if c != "synthetic"]
        row = {c: v for c, v in row_of(old, salt=store.user_salt).items() if c in columns}
        names = ", ".join(f'"{c}"' for c in columns)
        values = ", ".join(f":{c}" for c in columns)
        store._backend.write_many(f"INSERT INTO {TABLE} ({names}) VALUES ({values})", [row])

    for _ in range(2):  # the second open finds the column there and leaves it alone
        with Store(url, salt_path=salt_path) as store:
            window = (service, T0, T0 + timedelta(minutes=1))
            assert [r.request_id for r in store.records(*window)] == ["old-1"]  # a user's
            store.write([old.model_copy(update={"request_id": "new-1", "synthetic": True})])
            assert store.count(*window) == 1
            assert [r.request_id for r in store.records(*window, synthetic=True)] == ["new-1"]
            assert store.count(*window, synthetic=None) == 2


def test_asked_for_synthetic_load_a_stack_without_the_synthetic_listener_refuses(
    tmp_path: Path,
) -> None:
    """Not sent through the users' listener instead, where the gates would count it."""
    from canaryflow.contracts import Endpoints, ReleaseSpec, TrafficConfig
    from canaryflow.errors import ConfigError
    from canaryflow.local import examples
    from canaryflow.registry.signing import generate_keypair, sign
    from tasks.traffic import synthetic_traffic

    keys = generate_keypair(tmp_path, "ci", [examples.SERVICE])
    spec = ReleaseSpec(
        service=examples.SERVICE,
        candidate=sign(examples.manifest("1.2", "sandbox-good"), keys.private_path),
    )
    users_only = Endpoints(home=str(tmp_path), mlflow_uri="unused", keys_dir=str(tmp_path),
                           envoy_url="http://127.0.0.1:9")  # fmt: skip
    with synthetic_traffic(spec, users_only) as runner:  # not asked: nothing runs
        assert runner is None
    asked = spec.model_copy(update={"traffic": TrafficConfig(rate_rps=10)})
    with (
        pytest.raises(ConfigError, match="no synthetic Envoy listener"),
        synthetic_traffic(asked, users_only),
    ):
        pytest.fail("synthetic load started without a synthetic listener")


def test_preflight_refuses_synthetic_load_on_a_stack_without_a_synthetic_listener(
    tmp_path: Path,
) -> None:
    """Before anything is published: the release is refused, not started and rolled back."""
    from canaryflow import runbook
    from canaryflow.contracts import Endpoints, PolicyFloor, ReleaseSpec, TrafficConfig
    from canaryflow.errors import ConfigError
    from canaryflow.local import examples
    from canaryflow.registry.signing import generate_keypair, sign

    keys = generate_keypair(tmp_path, "ci", [examples.SERVICE])
    spec = ReleaseSpec(
        service=examples.SERVICE,
        candidate=sign(examples.manifest("1.2", "sandbox-good"), keys.private_path),
        traffic=TrafficConfig(rate_rps=10),
    )
    # MLflow and the provider are never reached: nothing listens on port 9.
    users_only = Endpoints(home=str(tmp_path), mlflow_uri="http://127.0.0.1:9",
                           keys_dir=str(tmp_path), envoy_url="http://127.0.0.1:9")  # fmt: skip
    with pytest.raises(ConfigError, match="no synthetic Envoy listener"):
        runbook.preflight(spec, users_only, PolicyFloor())
