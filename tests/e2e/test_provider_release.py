"""A release to a provider of the user's own, over HTTPS with a key, through the whole stack;
then the key is looked for everywhere a release leaves something, and found nowhere.

The session's stack (conftest) runs as a user's would: their providers file names `tls-sandbox`
(the sandbox over HTTPS, a CA made for the session, a bearer key required) and the variable its
key is in; the stack merged it with its own sandbox and gave the variable to its model services
only. A candidate whose `origin.provider` is that entry goes through preflight, the offline
evaluation (the worker's client), shadow and canary (the model services' forwarders) and is
promoted; with a wrong key in the worker the same release stops at preflight with one sentence
and nothing moves. The planted key is then searched for in every log line, error, Prefect flow
run, task run, log, artifact and event, every MLflow run and model version, every file under
the stack's home, the command line of every process and the environment of those that have no
use for it.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from canaryflow import connections
from canaryflow.contracts import (
    ApprovalConfig,
    CanaryPlan,
    CanaryStep,
    Origin,
    ReleaseRecord,
    ReleaseSpec,
    ShadowConfig,
)
from canaryflow.dataplane.store import Store
from canaryflow.deliveries import WEBHOOK_SECRET_ENV, WEBHOOK_SECRET_FILE
from canaryflow.loading import load_policy
from canaryflow.local import examples
from canaryflow.local.stack import PROVIDERS_FILE
from canaryflow.settings import STACK_FILE
from flows.release import release
from flows.rollback import rollback
from tests.e2e.conftest import PROVIDER, PROVIDER_KEY_VAR, LiveStack

ROOT = Path(__file__).resolve().parents[2]
POLICY = load_policy(ROOT / "deployments/policies/default.yaml")
MODEL = "sandbox-good"
WRONG = f"sk-wrong-{secrets.token_urlsafe(36)}"  # the worker's key in the refused release
# What the tests showed a person: records, errors, captured log lines. Searched at the end.
SHOWN: list[str] = []


def spec(live: LiveStack, version: str) -> ReleaseSpec:
    manifest = examples.manifest(version, MODEL)
    manifest = manifest.model_copy(update={"origin": Origin(provider=PROVIDER, model=MODEL)})
    return ReleaseSpec(
        service=examples.SERVICE,
        candidate=live.sign(manifest),
        # A quarter mirrored: the provider is one process on the same two cores as the rest.
        shadow=ShadowConfig(enabled=True, mirror_percent=25, duration_s=2.5, window_s=2.5),
        canary=CanaryPlan(steps=[CanaryStep(weight=25.0, windows=1, window_s=2.5)]),
        policy=POLICY,
        approval=ApprovalConfig(timeout_s=20, poll_s=1),  # nobody answers: fail, do not hang
        lock_wait_s=15.0,
    )


def aliases(live: LiveStack) -> dict[str, str]:
    return connections.registry(live.endpoints.mlflow_uri).aliases(examples.SERVICE)


def shown(record: ReleaseRecord, caplog: pytest.LogCaptureFixture, capfd: Any) -> None:
    out, err = capfd.readouterr()
    SHOWN.extend([record.model_dump_json(), caplog.text, out, err])


def served(live: LiveStack, version: str) -> dict[str, int]:
    """The model services' answered requests for `version`, by role, from the request store."""
    since = datetime.now(UTC) - timedelta(hours=1)
    with Store(str(live.endpoints.store_url)) as store:
        records = store.records(examples.SERVICE, since, datetime.now(UTC))
    roles: dict[str, int] = {}
    for record in records:
        if record.version == version and record.status == 200:
            roles[record.role] = roles.get(record.role, 0) + 1
    return roles


@pytest.mark.usefixtures("users")  # the gates judge their requests
def test_a_release_over_https_with_the_key_from_a_variable_is_promoted(
    live: LiveStack, caplog: pytest.LogCaptureFixture, capfd: Any
) -> None:
    before = aliases(live)["champion"]
    with caplog.at_level(logging.DEBUG):
        record = release(spec=spec(live, "3.1"))
    shown(record, caplog, capfd)

    assert record.decision == "promoted", record.reason
    stages = [s.key for s in record.stages]
    for key in ("preflight", "publish", "offline_eval", "shadow", "canary_25pct", "promote"):
        assert key in stages
    assert aliases(live)["champion"] == record.candidate_version
    # The worker's client (preflight, offline evaluation: the candidate's answers passed) and
    # the model services' forwarders (shadow and canary legs) reached the HTTPS provider.
    evidence = httpx.post(
        f"{live.endpoints.prefect_api_url}/artifacts/filter",
        json={"artifacts": {"key": {"like_": "preflight-my-assistant"}}, "sort": "CREATED_DESC"},
    ).json()[0]["data"]
    assert f"provider {PROVIDER} accepted the key and lists '{MODEL}'" in evidence
    assert next(s for s in record.stages if s.key == "offline_eval").outcome == "passed"
    roles = served(live, str(record.candidate_version))
    assert roles.get("shadow", 0) > 20 and roles.get("canary", 0) > 20, roles

    # Leave the session's stack as found: the champion of before, all traffic on it.
    summary = rollback(service=examples.SERVICE, reason="provider release test done")
    SHOWN.append(json.dumps(summary, default=str))
    assert aliases(live)["champion"] == before


def test_a_wrong_key_stops_the_release_at_preflight_and_moves_nothing(
    live: LiveStack,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capfd: Any,
) -> None:
    registry = connections.registry(live.endpoints.mlflow_uri)
    before = aliases(live)
    versions = len(registry.client.search_model_versions(f"name='{examples.SERVICE}'"))
    routes = connections.traffic_controller(live.endpoints, examples.SERVICE).current()
    monkeypatch.setenv(PROVIDER_KEY_VAR, WRONG)  # the worker's key; the services keep theirs
    with caplog.at_level(logging.DEBUG):
        record = release(spec=spec(live, "3.2"))
    shown(record, caplog, capfd)

    assert record.decision == "rejected"
    preflight = next(s for s in record.stages if s.key == "preflight")
    assert preflight.outcome == "failed"
    assert preflight.detail == (
        f"provider {PROVIDER} rejected the key from ${PROVIDER_KEY_VAR} (HTTP 401)"
    )
    assert record.candidate_version is None, "nothing may be published"
    assert aliases(live) == before
    assert len(registry.client.search_model_versions(f"name='{examples.SERVICE}'")) == versions
    assert connections.traffic_controller(live.endpoints, examples.SERVICE).current() == routes


# --------------------------------------------------------------------------- where to look


def prefect_everything(api: str) -> dict[str, str]:
    """Every flow run (parameters, state messages), task run, log line, artifact and event
    the session's Prefect server holds, as JSON text."""
    found: dict[str, str] = {}
    with httpx.Client(base_url=api, timeout=30) as client:
        for kind in ("flow_runs", "task_runs", "logs", "artifacts"):
            items: list[Any] = []
            while True:
                page = client.post(f"/{kind}/filter", json={"limit": 200, "offset": len(items)})
                page.raise_for_status()
                items += page.json()
                if len(page.json()) < 200:
                    break
            found[f"Prefect {kind}"] = json.dumps(items)
            assert items or kind == "task_runs", f"Prefect holds no {kind}: nothing was searched"
        events: list[Any] = []
        page = client.post("/events/filter", json={"limit": 50})  # the API's largest page
        while True:
            page.raise_for_status()
            events += page.json()["events"]
            if not page.json().get("next_page"):
                break
            page = client.get(page.json()["next_page"])
        assert events, "Prefect holds no events: nothing was searched"
        found["Prefect events"] = json.dumps(events)
    return found


def mlflow_everything(uri: str, folder: Path) -> dict[str, str]:
    """Params, tags, metric names and every artifact file of every run; tags, description
    and source of every registered model and version (read through MLflow's client)."""
    import mlflow

    client = connections.registry(uri).client
    found: dict[str, str] = {}
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments], max_results=5000)
    assert runs, "MLflow holds no run: nothing was searched"
    for run in runs:
        data = run.data
        found[f"MLflow run {run.info.run_id}"] = json.dumps(
            [data.params, data.tags, sorted(data.metrics), run.info.run_name]
        )
        target = folder / run.info.run_id
        target.mkdir()
        mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, dst_path=str(target), tracking_uri=uri
        )
        for path in target.rglob("*"):
            if path.is_file():
                found[f"MLflow artifact {path.relative_to(folder)}"] = path.read_text(
                    errors="replace"
                )
    for model in client.search_registered_models():
        versions = client.search_model_versions(f"name='{model.name}'")
        found[f"MLflow model {model.name}"] = json.dumps(
            [model.tags, model.description, [[v.tags, v.description, v.source] for v in versions]]
        )
    return found


def descendants(root: int) -> list[int]:
    """Every live process started, directly or not, by `root`."""
    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parent[int(entry.name)] = int(fields[1])
    found, frontier = [], [root]
    while frontier:
        children = [pid for pid, ppid in parent.items() if ppid in frontier]
        found += children
        frontier = children
    return found


def proc(pid: int, part: str) -> str | None:
    try:
        return (
            (Path(f"/proc/{pid}") / part).read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:  # ended meanwhile
        return None


# Processes that call the provider, and so may hold its key in their environment: the model
# services, a worker (a test's `prefect worker`), and the provider itself (it checks the key).
NEEDS_THE_KEY = ("canaryflow.dataplane.serve", "prefect worker", "--require-key")


def processes(live: LiveStack) -> tuple[dict[str, str], set[str], int]:
    """Command lines of every process this session started, and the environment of those
    that have no use for the key. Also: which kinds of server were looked at, and how many
    model services hold the key (they must: it is how they call the provider)."""
    found: dict[str, str] = {}
    seen: set[str] = set()
    holders = 0
    for pid in descendants(os.getpid()):
        command = proc(pid, "cmdline")
        if command is None:
            continue
        found[f"the command line of {pid} ({command[:80]})"] = command
        if any(mark in command for mark in NEEDS_THE_KEY):
            if "canaryflow.dataplane.serve" in command:
                holders += live.provider_key in (proc(pid, "environ") or "")
            continue
        environ = proc(pid, "environ")
        if environ is not None:
            found[f"the environment of {pid} ({command[:80]})"] = environ
            seen |= {k for k in ("prefect", "mlflow", "envoy", "prometheus") if k in command}
    return found, seen, holders


def files_under(home: Path) -> dict[str, bytes]:
    found = {}
    for path in home.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                found[str(path.relative_to(home))] = path.read_bytes()
            except OSError:  # a temporary file renamed or removed meanwhile
                continue
    return found


# --------------------------------------------------------------------------- the search


def test_the_planted_key_is_found_nowhere_and_private_files_are_owner_only(
    live: LiveStack, tmp_path: Path
) -> None:
    home = Path(live.endpoints.home)
    key = live.provider_key.encode()
    assert os.environ.get(PROVIDER_KEY_VAR) == live.provider_key, "the worker holds the key"

    # The stack's providers file: the user's entry by reference, and the sandbox.
    providers = (home / PROVIDERS_FILE).read_text()
    assert f"api_key_env: {PROVIDER_KEY_VAR}" in providers
    assert f"{PROVIDER}:" in providers and "sandbox:" in providers

    places: dict[str, bytes] = {f"the file {p}": t for p, t in files_under(home).items()}
    assert len(places) > 20 and f"the file {STACK_FILE}" in places
    routes = [p for p in places if p.endswith("routes.yaml")]
    assert routes, "the routes file is under the stack's home"
    texts = {
        **prefect_everything(str(live.endpoints.prefect_api_url)),
        **mlflow_everything(live.endpoints.mlflow_uri, tmp_path),
        "errors, records and captured log lines": "\n".join(SHOWN),
        "the user's provider's log": live.provider.log.read_text(errors="replace"),
    }
    commands, seen, holders = processes(live)
    texts.update(commands)
    assert seen == {"prefect", "mlflow", "envoy", "prometheus"}, (
        f"the environments of {seen} were read; Prefect, MLflow, Envoy and Prometheus expected"
    )
    assert holders == 2, "the primary and shadow services hold the key (the search can see it)"
    places.update({where: text.encode() for where, text in texts.items()})
    leaks = [where for where, text in places.items() if key in text or WRONG.encode() in text]
    assert not leaks, f"the key leaked into: {leaks}"

    # Secrets and user data under the home: owner-only.
    private = [STACK_FILE, PROVIDERS_FILE, "user-salt", "store.db", "eval-cache.db"]
    if not os.environ.get(WEBHOOK_SECRET_ENV):  # else the receiver reads it from there
        private.append(WEBHOOK_SECRET_FILE)
    private += [p.name for p in home.glob("*.db-wal")]
    for name in private:
        mode = stat.S_IMODE((home / name).stat().st_mode)
        assert mode == 0o600, f"{name} is mode {mode:o}, not 600"
    assert stat.S_IMODE(home.stat().st_mode) & 0o077 == 0
