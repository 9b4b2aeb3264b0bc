"""Probes end to end: the sender, a real Envoy's synthetic listener, a real model service and
store. Stable and the canary get the same labelled items; each is stored under the role Envoy
sent it to, marked synthetic and scored, and the pooled counts are what the gate reads."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from canaryflow.analysis.sources import StoreSource
from canaryflow.contracts import ProbesChecker, Role, Routes
from canaryflow.dataplane.envoy_routes import EnvoyRoutes
from canaryflow.dataplane.resolver import CachedResolver
from canaryflow.dataplane.service import ServiceConfig, build_app
from canaryflow.dataplane.store import Store
from canaryflow.evaluation.suites import load_suite
from canaryflow.local.envoy import EnvoyProxy
from canaryflow.local.probes import ProbeSender
from canaryflow.local.processes import free_port
from tests.integration.test_service import SERVICE, Registry, running, sandbox
from tests.waiting import wait_for

__all__ = ["sandbox"]  # the provider fixture, shared with test_service

ITEMS = [  # any answer passes the first; none can be exactly the second's text
    {"id": "any", "suite": "live", "kind": "fact", "input": "What is the capital of France?",
     "scorer": "regex", "expected": {"pattern": "\\S"}},
    {"id": "never", "suite": "live", "kind": "fact", "input": "What is the capital of Cuba?",
     "scorer": "exact", "expected": {"text": "no model answers with this sentence"}},
]  # fmt: skip


@pytest.fixture(scope="module")
def stack(
    sandbox: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[EnvoyProxy, Store, str]]:
    home = tmp_path_factory.mktemp("probe-stack")
    suite = home / "live.jsonl"
    suite.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    store = Store(str(home / "records.db"))
    config = ServiceConfig(
        service=SERVICE,
        provider_urls={"sandbox": sandbox},
        default_version="1",
        checkers=(ProbesChecker(suite=str(suite)),),
        flush_every_s=0.05,
    )
    resolver = CachedResolver(Registry().fetch, ttl_s=60, retry_s=0.05)
    with running(build_app(config, resolver=resolver, store=store)) as (url, _):
        upstream = ("127.0.0.1", int(url.rsplit(":", 1)[1]))
        proxy = EnvoyProxy(
            home / "envoy",
            service=SERVICE,
            listen_port=free_port(),
            admin_port=free_port(),
            upstreams={"stable": upstream, "canary": upstream, "shadow": upstream},
            initial_stable="1",
            synthetic_port=free_port(),
        )
        proxy.start()
        try:
            yield proxy, store, str(suite)
        finally:
            proxy.stop()
    store.close()


def test_probes_reach_stable_and_the_canary_and_are_scored(
    stack: tuple[EnvoyProxy, Store, str],
) -> None:
    proxy, store, suite = stack
    routes = EnvoyRoutes(proxy.home, proxy.admin_url, service=SERVICE)
    routes.set_routes(Routes(service=SERVICE, stable="1", canary="2", weight=10.0))
    routes.close()
    assert proxy.synthetic_url is not None
    start = datetime.now(UTC) - timedelta(milliseconds=1)
    sender = ProbeSender(
        proxy.synthetic_url, load_suite(suite), 20.0, lambda: ["stable", "canary"]
    ).start()
    time.sleep(1.0)
    report = sender.stop()
    assert report.errors == 0, report.describe()
    sent = report.sent["canary"]
    assert sent >= 4 and report.sent["stable"] == sent == report.answered["canary"]

    def all_stored() -> list[object] | None:
        found = store.records(SERVICE, start, datetime.now(UTC), synthetic=True)
        return found if len(found) >= 2 * sent else None  # type: ignore[return-value]

    wait_for("the probes in the store", all_stored, 10, 0.05)
    records = store.records(SERVICE, start, datetime.now(UTC), synthetic=True)
    assert {(r.role, r.version) for r in records} == {(Role.STABLE, "1"), (Role.CANARY, "2")}
    for record in records:
        assert record.probe in ("live/any", "live/never")
        assert record.probe_passed is (record.probe == "live/any")
    assert store.records(SERVICE, start, datetime.now(UTC)) == []  # no user saw a probe

    sample = StoreSource(store).window(SERVICE, "1", "2", start, datetime.now(UTC))
    assert sample.baseline.n == sample.candidate.n == 0  # users' gates count none of them
    assert sample.candidate.probes == sample.baseline.probes == sent
    passed = sum(r.probe_passed is True for r in records if r.role is Role.CANARY)
    assert sample.candidate.probes_passed == passed
