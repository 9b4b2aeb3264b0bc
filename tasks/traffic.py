"""Traffic steps: move the split, mirror to the shadow, roll back in one call."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from prefect import task

from canaryflow import runbook
from canaryflow.contracts import Endpoints, ReleaseSpec, Routes
from canaryflow.local.loadgen import TrafficReport, TrafficRunner, load_corpus
from tasks.common import retry_if_transient


@task(retries=2, retry_delay_seconds=[1.0, 3.0])
def warm_up_candidate(version: str, endpoints: Endpoints) -> list[str]:
    """Each model service loads the candidate's manifest before any request is routed to it."""
    return runbook.warm_up(endpoints, version)


@task(retries=2, retry_delay_seconds=[0.5, 1], retry_condition_fn=retry_if_transient)
def shift_traffic(routes: Routes, endpoints: Endpoints) -> Routes:
    """Returns only once Envoy reports the new routes live."""
    return runbook.set_routes(endpoints, routes)


@task
def roll_back_traffic(service: str, endpoints: Endpoints) -> runbook.TrafficRollback:
    """No retry: the controller confirms the stable-only routes are live, or raises at once."""
    return runbook.rollback_traffic(endpoints, service)


@contextlib.contextmanager
def synthetic_traffic(spec: ReleaseSpec, endpoints: Endpoints) -> Iterator[TrafficRunner | None]:
    """The embedded stack has no users: drive the spec's synthetic traffic through Envoy."""
    if spec.traffic is None or endpoints.envoy_url is None:
        yield None
        return
    runner = TrafficRunner(
        endpoints.envoy_url, load_corpus(spec.traffic.corpus), spec.traffic.rate_rps
    )
    runner.start()
    try:
        yield runner
    finally:
        report: TrafficReport = runner.stop()
        print(
            f"synthetic traffic: {report.sent} requests, {report.ok} ok, "
            f"p95 {report.latency_p95_ms or 0:.1f} ms"
        )
