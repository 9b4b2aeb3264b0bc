"""One embedded stack for the end-to-end tests: Prefect, MLflow, sandbox, Envoy, services.

It runs as a user's would with their own provider: a providers file naming `tls-sandbox` (the
sandbox over HTTPS with a CA made for the session, requiring a bearer key) is given to the stack
(merged with its own sandbox) and to the worker (`CANARYFLOW_PROVIDERS_FILE`), and the key is in
this process's environment when the stack starts, as `export KEY=...; canaryflow up` puts it.
The live LLM judge has a provider entry of its own (`judge`, another sandbox process), named in
the checkers policy the stack's model services run (`up --policy`), so a test can take the
judge down and bring it back.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from prefect.settings import PREFECT_API_URL, temporary_settings

from canaryflow import connections
from canaryflow.contracts import Endpoints, ModelManifest, ProvidersFile, SignedManifest
from canaryflow.local import examples
from canaryflow.local.loadgen import TrafficRunner
from canaryflow.local.processes import ManagedProcess, free_port, http_ok
from canaryflow.local.stack import EmbeddedStack
from canaryflow.providers.config import write_providers
from canaryflow.registry.signing import generate_keypair, sign
from canaryflow.settings import pinned_endpoints
from tests.certificates import SecuredSandbox, secured_sandbox

REPO = Path(__file__).resolve().parents[2]
PROVIDER = "tls-sandbox"  # the user's provider entry, in the providers file given to the stack
PROVIDER_KEY_VAR = "CANARYFLOW_E2E_TLS_SANDBOX_KEY"  # where the stack and the worker find its key
# Planted: a long random key that must show up nowhere but where it is needed. Read it from
# `LiveStack.provider_key`: this module may be imported twice (as a conftest and by name).
PROVIDER_KEY = f"sk-e2e-{secrets.token_urlsafe(36)}"


@dataclass(frozen=True)
class LiveStack:
    endpoints: Endpoints
    key: Path
    champion: str
    provider: SecuredSandbox  # the user's own provider: HTTPS, a key required
    provider_key: str = field(repr=False)  # in $PROVIDER_KEY_VAR here and the services only
    judge: ManagedProcess = field(repr=False)  # the live LLM judge's provider (`JUDGE`)

    def sign(self, manifest: ModelManifest) -> SignedManifest:
        return sign(manifest, self.key)


@pytest.fixture(scope="session")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    home = tmp_path_factory.mktemp("stack")
    folder = tmp_path_factory.mktemp("provider")
    with (
        pytest.MonkeyPatch.context() as env,
        secured_sandbox(folder, "CANARYFLOW_E2E_EXPECTED_KEY", PROVIDER_KEY, "warning") as provider,
    ):
        entry = {
            "base_url": f"{provider.url}/v1",
            "api_key_env": PROVIDER_KEY_VAR,
            "ca_bundle": str(provider.certs.ca),
            "timeout_s": E2E_REQUEST_TIMEOUT_S,
        }
        judge, judge_url = judge_process(folder)
        judge_entry = {"base_url": judge_url, "auth": "none"}
        providers_file = write_providers(
            folder / "providers.yaml",
            ProvidersFile.model_validate({"providers": {PROVIDER: entry, JUDGE: judge_entry}}),
        )
        env.setenv(PROVIDER_KEY_VAR, PROVIDER_KEY)
        env.setenv("CANARYFLOW_PROVIDERS_FILE", str(providers_file))
        judge.start(timeout_s=30)
        try:
            yield from _live(home, provider, providers_file, judge, checkers_policy(folder))
        finally:
            judge.stop()


JUDGE = "judge"  # the providers-file entry of the live LLM judge


def judge_process(folder: Path) -> tuple[ManagedProcess, str]:
    """A plain sandbox answering as the judge model (not started), and its base URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "canaryflow.sandbox", "--port", str(port)]
    judge = ManagedProcess(
        "judge", command, folder / "judge.log", http_ok(f"{url}/health"), cwd=REPO
    )
    return judge, f"{url}/v1"


def checkers_policy(folder: Path) -> Path:
    """The built-in checkers, the LLM judge reached through the `judge` entry."""
    policy = yaml.safe_load((REPO / "deployments/policies/default.yaml").read_text())
    for checker in policy["checkers"]:
        if checker["kind"] == "llm_judge":
            checker["provider"] = JUDGE
    path = folder / "checkers.yaml"
    path.write_text(yaml.safe_dump(policy))
    return path


def _live(
    home: Path,
    provider: SecuredSandbox,
    providers_file: Path,
    judge: ManagedProcess,
    policy: Path,
) -> Iterator[LiveStack]:
    # A short provider timeout: a promotion waits that long for the last window's late finishers.
    stack = EmbeddedStack(
        home,
        ui=False,
        request_timeout_s=E2E_REQUEST_TIMEOUT_S,
        providers_file=providers_file,
        checkers_policy=policy,
    )
    try:
        endpoints = stack.start()
        keys = generate_keypair(Path(endpoints.keys_dir), "ci", [examples.SERVICE])
        registry = connections.registry(endpoints.mlflow_uri)
        champion = registry.publish(
            sign(examples.manifest("1.1", "sandbox-base"), keys.private_path)
        )
        registry.promote(champion.service, champion.version)
        endpoints = stack.start_dataplane(examples.SERVICE, champion.version)
        # Prefect reads its settings once at import: point the running context at our server.
        # Flows take no endpoints: this process pins the stack's, as the CLI and demo do.
        with (
            temporary_settings(updates={PREFECT_API_URL: endpoints.prefect_api_url}),
            pinned_endpoints(endpoints),
        ):
            yield LiveStack(
                endpoints,
                keys.private_path,
                champion.version,
                provider,
                PROVIDER_KEY,
                judge,
            )
    finally:
        stack.stop()


E2E_REQUEST_TIMEOUT_S = 3.0  # sandbox answers take ~40-70 ms; a hang is an error after 3 s
USERS_RPS = 200.0  # a 2.5 s window at a 25 % canary step: ~125 candidate requests


@pytest.fixture
def users(live: LiveStack) -> Iterator[TrafficRunner]:
    """Production has users; the embedded stack has these, around one test: the example corpus
    sent to Envoy's public listener at `USERS_RPS`, started and stopped here, never by a flow.
    Their requests are what the release's gates judge. Yielded once the store sees them at
    half their rate or more: preflight plans the release from the traffic it measures there,
    and a burst of an earlier test's users seconds before would halve what it measures."""
    from canaryflow.runbook import recent_user_rps
    from tests.waiting import wait_for

    with examples.simulated_users(live.endpoints, USERS_RPS) as runner:
        wait_for(
            "the users' requests in the store",
            lambda: (recent_user_rps(live.endpoints, examples.SERVICE) or 0) >= USERS_RPS / 2,
            30,
            0.2,
        )
        yield runner


def prefect_cli(live: LiveStack, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PREFECT_API_URL": str(live.endpoints.prefect_api_url),
        "CANARYFLOW_PROJECT_DIR": str(REPO),
        "CANARYFLOW_HOME": live.endpoints.home,
    }
    return subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
