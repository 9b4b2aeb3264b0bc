"""A canary never outlives its owner: the silence automation and the release's state hooks.

The automation is the rollback deployment's `triggers:` entry in prefect.yaml, created here from
that same definition with the shortest `within` Prefect accepts for a proactive trigger (10 s).
The hooks are tested on a deployed release run, picked up by a real process worker and cancelled
through the API, because only a supervised run can be cancelled at all (see test docstring).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

from canaryflow import connections, retries
from canaryflow.contracts import (
    CanaryPlan,
    CanaryStep,
    ReleaseSpec,
    Routes,
    ShadowConfig,
    TrafficConfig,
)
from canaryflow.errors import ReleaseBusy
from canaryflow.local import examples
from canaryflow.local.processes import ManagedProcess, free_port, http_ok
from canaryflow.local.stack import PYTHON
from flows.rollback import rollback
from tasks.approval import approval_heartbeat, heartbeat_every
from tasks.common import emit, flush_events
from tasks.lock import LEASE_S, release_lock
from tests.e2e.conftest import LiveStack, prefect_cli
from tests.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
POOL = "canaryflow"
SILENCE_S = 10  # Prefect's minimum `within` for a proactive trigger
# Evaluated every PREFECT_SERVER_EVENTS_PROACTIVE_GRANULARITY (1 s on the embedded stack).
FIRE_DEADLINE_S = SILENCE_S + 15


@pytest.fixture(scope="module")
def deployed(live: LiveStack) -> Iterator[LiveStack]:
    created = prefect_cli(live, "work-pool", "create", POOL, "--type", "process", "--overwrite")
    assert created.returncode == 0, created.stdout + created.stderr
    deployed = prefect_cli(live, "deploy", "--all")
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    yield live
    # test_deployments.py creates the pool itself: leave the server as this module found it.
    prefect_cli(live, "work-pool", "delete", POOL)


def _api(live: LiveStack) -> str:
    return str(live.endpoints.prefect_api_url)


def _prefect_api(method: str, url: str, **kwargs: Any) -> httpx.Response:
    """Prefect's REST API as its own client calls it: a 503 (its SQLite busy while several
    runs, a worker and the automation write at once) is retried, with the project's policy."""
    return retries.call(lambda: httpx.request(method, url, timeout=30, **kwargs))


def _deployment_id(live: LiveStack, flow: str, name: str) -> str:
    response = _prefect_api("GET", f"{_api(live)}/deployments/name/{flow}/{name}")
    response.raise_for_status()
    return str(response.json()["id"])


def _silence_trigger_spec() -> dict[str, Any]:
    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    rollback = next(d for d in config["deployments"] if d["name"] == "rollback")
    return dict(rollback["triggers"][0])


@contextlib.contextmanager
def silence_automation(live: LiveStack, within_s: float) -> Iterator[str]:
    """prefect.yaml's silence trigger with a test-sized `within`, removed afterwards."""
    spec = _silence_trigger_spec()
    trigger = DeploymentEventTrigger.model_validate(
        {**spec, "name": f"{spec['name']}-test-{uuid.uuid4().hex[:6]}", "within": within_s}
    )
    trigger.set_deployment_id(uuid.UUID(_deployment_id(live, "rollback", "rollback")))
    with get_client(sync_client=True) as client:
        automation_id = client.create_automation(trigger.as_automation())
    try:
        yield str(automation_id)
    finally:
        with get_client(sync_client=True) as client:
            client.delete_automation(automation_id)


def _rollback_runs(live: LiveStack, service: str) -> list[dict[str, Any]]:
    runs = _prefect_api(
        "POST",
        f"{_api(live)}/flow_runs/filter",
        json={"deployments": {"id": {"any_": [_deployment_id(live, "rollback", "rollback")]}}},
    ).json()
    return [r for r in runs if r["parameters"].get("service") == service]


def _delete_runs(live: LiveStack, runs: list[dict[str, Any]]) -> None:
    """No worker may ever pick these up: they would roll back a service that does not exist."""
    for run in runs:
        httpx.delete(f"{_api(live)}/flow_runs/{run['id']}")


def _send(event: str, release_id: str, service: str, **payload: Any) -> None:
    stage, outcome = event.split(".")
    emit(stage, outcome, release_id, service, **payload)
    flush_events()


def test_silent_canary_runs_the_rollback_deployment(deployed: LiveStack) -> None:
    service = f"silent-{uuid.uuid4().hex[:6]}"
    release_id = f"{service}-r1"
    with silence_automation(deployed, SILENCE_S):
        started = time.monotonic()
        _send("live.started", release_id, service, stable="1", candidate="2")
        runs = wait_for(
            f"a rollback run of {service}, silent since {release_id} started",
            lambda: _rollback_runs(deployed, service),
            FIRE_DEADLINE_S,
            0.5,
        )
        elapsed = time.monotonic() - started
    try:
        assert len(runs) == 1, f"{len(runs)} rollback runs for one silent canary"
        assert elapsed >= SILENCE_S - 1, f"fired after {elapsed:.1f} s, before the silence ran out"
        parameters = runs[0]["parameters"]
        assert parameters["service"] == service
        assert parameters["to_alias"] == "champion"
        assert "silent canary" in parameters["reason"] and release_id in parameters["reason"]
        assert "canaryflow.live.started" in parameters["reason"]
    finally:
        _delete_runs(deployed, runs)


def test_windows_beating_approval_pauses_and_the_end_of_a_release_keep_it_quiet(
    deployed: LiveStack,
) -> None:
    """A paused release beats (the real heartbeat thread, paced by the test's `within`) and is
    left alone for 2x `within`; one whose beats stop, as when its process dies during the
    pause, is rolled back `within` after its last beat."""
    busy, paused, stalled, control = (
        f"{kind}-{uuid.uuid4().hex[:6]}" for kind in ("busy", "paused", "stalled", "control")
    )
    every_s = heartbeat_every(SILENCE_S)
    try:
        with (
            silence_automation(deployed, SILENCE_S),
            approval_heartbeat(f"{paused}-r1", paused, "canary", "k", every_s),
            approval_heartbeat(f"{stalled}-r1", stalled, "canary", "k", every_s) as stall,
        ):
            for service in (busy, paused, stalled):
                _send("live.started", f"{service}-r1", service)
            for service in (paused, stalled):
                _send("window.pass", f"{service}-r1", service)
                _send("canary_approval.waiting", f"{service}-r1", service)
            started = time.monotonic()
            # The scenario itself, on Prefect's clock: a busy release reports a window every
            # 2 s for twice the silence allowed, while two wait for an approval; one of them
            # stops beating after 4 s (its heartbeat thread is stopped, as by a dead process).
            while time.monotonic() - started < SILENCE_S * 2:
                time.sleep(2)
                _send("window.pass", f"{busy}-r1", busy)
                if not stall.is_set() and time.monotonic() - started >= 4:
                    stall.set()
                    stalled_at = time.monotonic()
            _send("canary_approval.approved", f"{paused}-r1", paused)
            _send("release.promoted", f"{busy}-r1", busy)
            _send("release.rolled_back", f"{paused}-r1", paused)
            # A control release goes silent after all of that: its bucket expires no earlier
            # than one left open by mistake above, so once the control's rollback run exists,
            # such a bucket has fired as well (and the automation is shown to be firing at all).
            _send("live.started", f"{control}-r1", control)
            wait_for(
                f"the rollback run of the silent control release {control}",
                lambda: _rollback_runs(deployed, control),
                FIRE_DEADLINE_S,
                0.5,
            )
            fired = _rollback_runs(deployed, busy) + _rollback_runs(deployed, paused)
            stalled_runs = _rollback_runs(deployed, stalled)
    finally:
        _delete_runs(
            deployed,
            [r for s in (busy, paused, stalled, control) for r in _rollback_runs(deployed, s)],
        )
    assert fired == [], [r["parameters"] for r in fired]
    # Fired within the 2x `within` above, SILENCE_S after the last beat (< every_s before the stop).
    assert len(stalled_runs) == 1, f"{len(stalled_runs)} rollback runs for the stalled release"
    assert "canaryflow.approval.heartbeat" in stalled_runs[0]["parameters"]["reason"]
    fired_after = _created_s(stalled_runs[0]) - (time.time() - (time.monotonic() - stalled_at))
    print(f"stalled approval rolled back {fired_after:.1f} s after its beats stopped")
    assert SILENCE_S - every_s - 1 <= fired_after <= FIRE_DEADLINE_S


def _created_s(run: dict[str, Any]) -> float:
    return datetime.fromisoformat(run["created"]).timestamp()


def _worker_process(live: LiveStack, log_dir: Path) -> ManagedProcess:
    """A real `prefect worker` on the pool, as on a worker machine."""
    port = free_port()
    return ManagedProcess(
        name="prefect-worker",
        command=[PYTHON, "-m", "prefect", "worker", "start", "--pool", POOL, "--with-healthcheck"],
        log_path=log_dir / "worker.log",
        ready=http_ok(f"http://127.0.0.1:{port}/health"),
        env={
            "PREFECT_API_URL": _api(live),
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_WORKER_WEBSERVER_HOST": "127.0.0.1",
            "PREFECT_WORKER_WEBSERVER_PORT": str(port),
            "CANARYFLOW_PROJECT_DIR": str(REPO),
            "CANARYFLOW_HOME": live.endpoints.home,
            "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        },
    )


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc: Linux)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def test_a_killed_worker_leaves_the_automation_to_roll_back_and_its_lock_frees(
    deployed: LiveStack, tmp_path: Path
) -> None:
    """SIGKILL of the worker machine (the worker and the flow-run process it started) while the
    canary is live. No hook runs: Prefect marks a run crashed only through a live worker or
    runner, so the run stays Running. The silence automation is the net: once a new worker is
    up, it rolls the service back. The dead release's lock frees when its lease (60 s) runs out;
    until then a new release is refused with a message naming the dead run."""
    controller = connections.traffic_controller(deployed.endpoints, examples.SERVICE)
    stable = controller.current()
    assert stable is not None and stable.canary is None
    spec = ReleaseSpec(
        service=examples.SERVICE,
        candidate=deployed.sign(examples.manifest("4.4", "sandbox-good")),
        suites=["golden"],
        shadow=ShadowConfig(enabled=False),
        canary=CanaryPlan(steps=[CanaryStep(weight=25, windows=1, window_s=120)]),
    )
    first = _worker_process(deployed, tmp_path / "first")
    first.start(60)
    with silence_automation(deployed, SILENCE_S):
        try:
            release_id = _deployment_id(deployed, "release", "release")
            response = _prefect_api(
                "POST",
                f"{_api(deployed)}/deployments/{release_id}/create_flow_run",
                json={"parameters": {"spec": spec.model_dump(mode="json")}},
            )
            response.raise_for_status()
            run = response.json()

            def canary_live() -> bool:
                routes = controller.current()
                return routes is not None and routes.canary is not None and routes.weight > 0

            wait_for("the canary to get traffic", canary_live, 150, 0.2)
            assert first.process is not None
            doomed = [first.process.pid, *_descendants(first.process.pid)]
            for pid in doomed:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
        finally:
            first.stop()
        # While the lease holds: refused, naming the dead run.
        with pytest.raises(ReleaseBusy) as refused, release_lock(examples.SERVICE, 0.5):
            pass
        assert run["name"] in str(refused.value) and run["id"] in str(refused.value)
        # A replacement worker: the automation's rollback run needs one.
        second = _worker_process(deployed, tmp_path / "second")
        second.start(60)
        try:
            wait_for("stable-only routes", lambda: not canary_live(), 90, 0.2)
            to_stable_s = time.monotonic() - killed
            with release_lock(examples.SERVICE, 120):
                lock_free_s = time.monotonic() - killed
        finally:
            second.stop()
            _prefect_api(
                "POST",
                f"{_api(deployed)}/flow_runs/{run['id']}/set_state",
                json={"state": {"type": "CRASHED", "name": "Crashed"}, "force": True},
            )
    print(f"killed worker: stable after {to_stable_s:.1f} s, lock free after {lock_free_s:.1f} s")
    routes = controller.current()
    assert routes is not None and routes.stable == stable.stable and routes.canary is None
    state = _prefect_api("GET", f"{_api(deployed)}/flow_runs/{run['id']}").json()["state"]
    assert to_stable_s <= SILENCE_S + 30
    # The lease runs out 60 s after its last renewal; the server frees expired leases on its
    # own schedule after that (measured 65-71 s, n=2).
    assert lock_free_s <= LEASE_S + 30
    assert state["type"] == "CRASHED"


@pytest.fixture(scope="module")
def worker(
    deployed: LiveStack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ManagedProcess]:
    process = _worker_process(deployed, tmp_path_factory.mktemp("worker"))
    process.start(60)
    try:
        yield process
    finally:
        process.stop()


def test_cancelled_release_run_puts_all_traffic_back_on_stable(
    deployed: LiveStack, worker: ManagedProcess
) -> None:
    """Cancelling a deployed run: the worker signals the flow's process, the hooks run.

    A release called in-process has no supervisor watching its state (Prefect 3.9's source:
    cancellation is the runner's SIGTERM plus its control channel), so only a supervised run
    (worker or `serve`) can be cancelled. The hook then runs in the worker, not the flow.
    """
    controller = connections.traffic_controller(deployed.endpoints, examples.SERVICE)
    stable = controller.current()
    assert stable is not None and stable.canary is None
    spec = ReleaseSpec(
        service=examples.SERVICE,
        candidate=deployed.sign(examples.manifest("4.1", "sandbox-good")),
        suites=["golden"],
        shadow=ShadowConfig(enabled=False),
        canary=CanaryPlan(steps=[CanaryStep(weight=25, windows=1, window_s=120)]),
        traffic=TrafficConfig(rate_rps=50),
        lock_wait_s=60,
    )
    release_id = _deployment_id(deployed, "release", "release")
    response = _prefect_api(
        "POST",
        f"{_api(deployed)}/deployments/{release_id}/create_flow_run",
        # No endpoints: the worker's own stack (CANARYFLOW_HOME) is what a flow works with.
        json={"parameters": {"spec": spec.model_dump(mode="json")}},
    )
    response.raise_for_status()
    run_id = response.json()["id"]

    def canary_live() -> bool:
        routes = controller.current()
        return routes is not None and routes.canary is not None and routes.weight > 0

    try:
        wait_for("the canary to get traffic", canary_live, 150, 0.5)
    except pytest.fail.Exception:
        run = _prefect_api("GET", f"{_api(deployed)}/flow_runs/{run_id}").json()
        print(run["state"], worker.tail(60), sep="\n")
        raise
    _prefect_api(
        "POST",
        f"{_api(deployed)}/flow_runs/{run_id}/set_state",
        json={"state": {"type": "CANCELLING", "name": "Cancelling"}},
    ).raise_for_status()

    def final_state() -> str | None:
        state = _prefect_api("GET", f"{_api(deployed)}/flow_runs/{run_id}").json()["state"]
        return str(state["type"]) if state["type"] in {"CANCELLED", "CRASHED"} else None

    ended = wait_for("the run to end", final_state, 90, 0.5)
    routes = controller.current()
    assert routes is not None and routes.canary is None and routes.weight == 0
    assert routes.stable == stable.stable and routes.shadow is None
    # The body's `except BaseException` rolled back first; the hook (run by the worker after
    # it killed the flow's process) says so with its event.
    hook_events = wait_for("the on_cancellation hook's event", lambda: _events(
        deployed, "canaryflow.release.cancelling", run_id), 30, 0.5)  # fmt: skip
    assert hook_events[0]["payload"]["stable"] == stable.stable
    assert ended == "CANCELLED"


def _events(live: LiveStack, name: str, run_id: str) -> list[dict[str, Any]]:
    events = _prefect_api(
        "POST",
        f"{_api(live)}/events/filter",
        json={"filter": {"event": {"name": [name]}}, "limit": 50},
    ).json()["events"]
    return [e for e in events if e["payload"].get("flow_run_id") == run_id]


def test_rollback_the_automation_runs_retires_the_abandoned_challenger(live: LiveStack) -> None:
    """What the trigger starts: traffic off the canary, champion kept, candidate rolled back."""
    registry = connections.registry(live.endpoints.mlflow_uri)
    champion = registry.resolve(examples.SERVICE, "champion").version
    candidate = registry.publish(live.sign(examples.manifest("4.2", "sandbox-good")))
    registry.start_challenger(examples.SERVICE, candidate.version)
    controller = connections.traffic_controller(live.endpoints, examples.SERVICE)
    controller.set_routes(
        Routes(service=examples.SERVICE, stable=champion, canary=candidate.version, weight=25)
    )

    summary = rollback(
        service=examples.SERVICE,
        to_alias="champion",
        reason="silent canary: test",
    )

    routes = controller.current()
    assert routes is not None and (routes.stable, routes.canary) == (champion, None)
    assert summary["retired_challenger"] == candidate.version
    aliases = registry.aliases(examples.SERVICE)
    assert aliases["champion"] == champion and "challenger" not in aliases
    assert registry.get(examples.SERVICE, candidate.version).status == "rolled_back"
