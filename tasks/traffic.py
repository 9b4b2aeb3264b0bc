"""Traffic steps: move the split, mirror to the shadow, roll back in one call; the load and
the probes a release sends while its candidate is live."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

from prefect.client.schemas.objects import FlowRun, State
from prefect.flows import Flow

from canaryflow import connections, runbook
from canaryflow.contracts import Endpoints, ProbesChecker, ReleaseSpec, Routes
from canaryflow.errors import ConfigError, ReleaseBusy
from canaryflow.evaluation.suites import load_suite
from canaryflow.local.loadgen import TrafficReport, TrafficRunner, load_corpus
from canaryflow.local.probes import ProbeSender
from canaryflow.settings import worker_endpoints
from tasks.common import emit, flush_events, say, step

log = logging.getLogger("canaryflow.release")


@step()
def warm_up_candidate(version: str, endpoints: Endpoints) -> list[str]:
    """Each model service loads the candidate's manifest before any request is routed to it."""
    return runbook.warm_up(endpoints, version)


@step()
def shift_traffic(routes: Routes, endpoints: Endpoints) -> Routes:
    """Returns only once Envoy reports the new routes live."""
    return connections.traffic_controller(endpoints, routes.service).set_routes(routes)


@step(retries=0)
def roll_back_traffic(service: str, endpoints: Endpoints) -> runbook.TrafficRollback:
    """No retry: the controller keeps confirming the stable-only routes until its deadline,
    and never puts older routes back; an unconfirmed rollback comes back marked so."""
    return runbook.rollback_traffic(endpoints, service)


@step(retries=0)
def send_all_traffic_to(
    service: str, version: str, endpoints: Endpoints
) -> runbook.TrafficRollback:
    """On-call's rollback to a named version; no retry, like `roll_back_traffic`."""
    return runbook.route_all_to(endpoints, service, version)


def _refused_at_the_lock(state: State[Any]) -> bool:
    """A run that never got the service's lock moved nothing: another release owns the routes."""
    if not state.is_failed():
        return False
    try:
        return isinstance(state.result(raise_on_failure=False), ReleaseBusy)
    except Exception:  # no result to read: it cannot have been refused at the lock
        return False


def roll_back_on_crash(flow: Flow[..., Any], flow_run: FlowRun, state: State[Any]) -> None:
    """A flow hook: a crashed, cancelled or failed release returns all traffic to stable at
    once (traffic first), then retires its challenger like every other rollback.

    Only its own traffic: a run refused at the lock, or whose candidate is not on the live
    routes, leaves the service alone (another release may own it). When that cannot be told
    (the registry is down), it rolls back: moving traffic to stable is the safe side.
    """
    spec = ReleaseSpec.model_validate(flow_run.parameters["spec"])
    endpoints = worker_endpoints()
    if _refused_at_the_lock(state):
        return
    try:
        ours = runbook.candidate_is_live(endpoints, spec)
    except Exception as exc:
        log.warning(
            "cannot tell whether %s's candidate is live (%s): rolling back", spec.service, exc
        )
        ours = True
    figures: dict[str, object] = {}
    if ours:
        result = runbook.rollback_traffic(endpoints, spec.service)
        figures = {"stable": result.after.stable, "rollback_ms": result.rollback_ms}
        try:
            runbook.retire_challenger(endpoints, spec.service, f"release ended {state.name}")
        except Exception as exc:  # traffic is safe already; the registry can be fixed by hand
            log.warning("could not retire the challenger of %s: %s", spec.service, exc)
    else:  # the run's own rollback already ran, or its candidate never got traffic
        log.info("%s: this run's candidate has no live traffic; routes left alone", spec.service)
        current = connections.traffic_controller(endpoints, spec.service).current()
        figures = {"stable": current.stable if current else None, "rollback_ms": 0.0}
    # Evidence for on-call, and the end of the release for the silence automation.
    emit("release", state.type.value.lower(), f"{spec.service}-{flow_run.name}", spec.service,
         flow_run_id=str(flow_run.id), state=state.name, **figures)  # fmt: skip
    flush_events()


@contextlib.contextmanager
def synthetic_traffic(spec: ReleaseSpec, endpoints: Endpoints) -> Iterator[TrafficRunner | None]:
    """The load a spec asks for (`spec.traffic`; none unless asked), through Envoy's synthetic
    listener: every request is marked synthetic at the edge, so no gate counts it. Refused when
    the stack has no such listener, rather than sent where it would pass for users."""
    if spec.traffic is None:
        yield None
        return
    if endpoints.envoy_synthetic_url is None:
        raise ConfigError(
            f"the spec of {spec.service} asks for synthetic traffic, but this stack has no "
            "synthetic Envoy listener (endpoints.envoy_synthetic_url): it will not be sent "
            "through the users' listener, where the gates would count it; drop `traffic`"
        )
    runner = TrafficRunner(
        endpoints.envoy_synthetic_url, load_corpus(spec.traffic.corpus), spec.traffic.rate_rps
    )
    runner.start()
    try:
        yield runner
    finally:
        report: TrafficReport = runner.stop()
        say(
            "synthetic traffic: %d requests, %d ok, p95 %.1f ms",
            report.sent,
            report.ok,
            report.latency_p95_ms or 0,
        )


def _candidate_roles(endpoints: Endpoints, service: str, candidate: str) -> Callable[[], list[str]]:
    """Stable and the candidate's live role (shadow or canary), read from the routes at most
    once a second; nothing while the candidate has no role (its probes would be unpaired)."""
    controller = connections.traffic_controller(endpoints, service)
    seen: dict[str, Any] = {"at": -math.inf, "roles": []}

    def roles() -> list[str]:
        if time.monotonic() - seen["at"] >= 1.0:
            routes = controller.current()
            found: list[str] = []
            if routes is not None and routes.canary == candidate:
                found = ["stable", "canary"]
            elif routes is not None and routes.shadow == candidate:
                found = ["stable", "shadow"]
            seen.update(at=time.monotonic(), roles=found)
        return list(seen["roles"])

    return roles


@contextlib.contextmanager
def probe_traffic(spec: ReleaseSpec, endpoints: Endpoints, candidate: str) -> Iterator[int]:
    """The policy's probes (its `probes` checkers; none: nothing is sent) at each one's rate,
    to stable and the candidate's role through Envoy's synthetic listener, while the block
    runs; yields how many senders run. Refused without that listener, like synthetic load."""
    configs = [c for c in spec.policy.checkers if isinstance(c, ProbesChecker)]
    if not configs:
        yield 0
        return
    if endpoints.envoy_synthetic_url is None:
        raise ConfigError(
            f"the policy of {spec.service} sends probes, but this stack has no synthetic Envoy "
            "listener (endpoints.envoy_synthetic_url): they will not be sent through the users' "
            "listener, where the gates would count them; drop the probes checker"
        )
    roles = _candidate_roles(endpoints, spec.service, candidate)
    senders = [
        ProbeSender(endpoints.envoy_synthetic_url, load_suite(c.suite), c.rate_per_s, roles)
        for c in configs
    ]
    for sender in senders:
        sender.start()
    try:
        yield len(senders)
    finally:
        for sender in senders:
            say("%s", sender.stop().describe())
