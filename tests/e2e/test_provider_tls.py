"""The model service in front of a provider that wants a key over HTTPS, as real processes.

The sandbox runs with `--tls-cert/--tls-key` (a CA made for this module) and `--require-key`; a
model service (`canaryflow serve --providers FILE`) reaches it with the key from its own
environment variable and the CA bundle of its providers file. A chat through it succeeds; a
service holding a wrong key answers one sentence that names the variable, and records an
error. The planted key is then looked for in both processes' logs, command lines and stores,
and in the wrong-key service's environment: it is in none. The offline evaluation, the
provider preflight and each of the three forwarders reach the same provider through the same
providers file.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sqlite3
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from canaryflow import runbook
from canaryflow.contracts import (
    Endpoints,
    GatePolicy,
    ModelManifest,
    Origin,
    ProvidersFile,
    ReleaseSpec,
    RequestRecord,
)
from canaryflow.dataplane.forwarder import ForwarderKind, Upstreams, make_forwarder
from canaryflow.dataplane.store import Store
from canaryflow.errors import ProviderResponseError
from canaryflow.evaluation.harness import ERROR_PREFIX
from canaryflow.local import examples
from canaryflow.local.processes import ManagedProcess, free_port, http_ok
from canaryflow.providers.config import load_providers, write_providers
from canaryflow.registry.signing import generate_keypair, sign
from tests.certificates import Certificates, secured_sandbox

ROOT = Path(__file__).resolve().parents[2]
SANDBOX_KEY_VAR = "CANARYFLOW_E2E_SANDBOX_KEY"  # the key the provider expects
SERVICE_KEY_VAR = "CANARYFLOW_E2E_PROVIDER_KEY"  # the key the model service sends
PLANTED = f"sk-planted-{secrets.token_hex(12)}"
WRONG = f"sk-wrong-{secrets.token_hex(12)}"
FAST = "sandbox-good@latency_ms=0,error_rate=0"
QUESTION = "What is the capital of France?"


@dataclass(frozen=True)
class Provider:
    url: str
    certs: Certificates
    log: Path
    process: ManagedProcess

    def providers(self) -> ProvidersFile:
        return ProvidersFile.model_validate(
            {
                "providers": {
                    "secured": {
                        "base_url": f"{self.url}/v1",
                        "api_key_env": SERVICE_KEY_VAR,
                        "ca_bundle": str(self.certs.ca),
                        "timeout_s": 5.0,
                    }
                }
            }
        )


@dataclass(frozen=True)
class Service:
    url: str
    log: Path
    store: Path
    process: ManagedProcess

    def chat(self) -> httpx.Response:
        body = {"messages": [{"role": "user", "content": QUESTION}]}
        return httpx.post(f"{self.url}/v1/chat/completions", json=body, timeout=10)


def manifest() -> ModelManifest:
    base = examples.manifest("1.0", FAST)
    return base.model_copy(update={"origin": Origin(provider="secured", model=FAST)})


@pytest.fixture(scope="module")
def provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Provider]:
    folder = tmp_path_factory.mktemp("tls-sandbox")
    with secured_sandbox(folder, SANDBOX_KEY_VAR, PLANTED) as sandbox:
        yield Provider(sandbox.url, sandbox.certs, sandbox.log, sandbox.process)


def model_service(folder: Path, provider: Provider, key: str | None) -> Service:
    """`canaryflow serve` with a providers file naming the key's variable, never the key."""
    folder.mkdir()
    providers = write_providers(folder / "providers.yaml", provider.providers())
    manifest_file = folder / "manifest.json"
    manifest_file.write_text(manifest().model_dump_json())
    port, admin_port = free_port(), free_port()
    store = folder / "records.db"
    process = ManagedProcess(
        name=f"service-{folder.name}",
        command=[
            sys.executable, "-m", "canaryflow.dataplane.serve", "--service", examples.SERVICE,
            "--port", str(port), "--admin-port", str(admin_port),
            "--manifest", f"1={manifest_file}", "--default-version", "1",
            "--providers", str(providers), "--store", str(store), "--check-sample", "1.0",
        ],
        log_path=folder / "service.log",
        ready=http_ok(f"http://127.0.0.1:{port}/health"),
        env={"PYTHONPATH": str(ROOT), **({SERVICE_KEY_VAR: key} if key else {})},
        cwd=ROOT,
    )  # fmt: skip
    return Service(f"http://127.0.0.1:{port}", folder / "service.log", store, process)


def stored(service: Service) -> tuple[RequestRecord, str]:
    """The one request record, once written (the service writes in batches), and every row of
    every table of the store as text."""
    since, until = (
        datetime.now(UTC) - timedelta(minutes=5),
        datetime.now(UTC) + timedelta(minutes=1),
    )
    deadline = time.monotonic() + 5.0
    records: list[RequestRecord] = []
    while not records and time.monotonic() < deadline:
        time.sleep(0.1)
        if service.store.exists():
            with Store(f"sqlite:///{service.store}") as store:
                records = store.records(examples.SERVICE, since, until)
    assert len(records) == 1, f"{service.store} holds {len(records)} records, expected 1"
    with sqlite3.connect(service.store) as connection:
        query = "SELECT name FROM sqlite_master WHERE type = 'table'"
        tables = [name for (name,) in connection.execute(query)]
        rows = [repr(row) for t in tables for row in connection.execute(f'SELECT * FROM "{t}"')]
    return records[0], "\n".join(rows)


def proc_text(process: ManagedProcess, part: str) -> str:
    assert process.process is not None
    return Path(f"/proc/{process.process.pid}/{part}").read_bytes().decode(errors="replace")


def test_a_chat_through_the_service_reaches_the_https_provider_with_the_key(
    provider: Provider, tmp_path: Path
) -> None:
    right = model_service(tmp_path / "right", provider, PLANTED)
    wrong = model_service(tmp_path / "wrong", provider, WRONG)
    unset = model_service(tmp_path / "unset", provider, None)
    with ExitStack() as running:
        for service in (right, wrong, unset):
            service.process.start(timeout_s=30)
            running.callback(service.process.stop)
        answered = right.chat()
        assert answered.status_code == 200, answered.text
        assert "Paris" in answered.json()["choices"][0]["message"]["content"]

        refused = wrong.chat()
        assert refused.status_code == 502
        error = refused.json()["error"]
        assert error["message"] == (
            f"provider secured rejected the key from ${SERVICE_KEY_VAR} (HTTP 401)"
        )
        assert error["type"] == "provider_auth_error"
        assert PLANTED not in refused.text and WRONG not in refused.text
        missing = unset.chat()  # started at once: waiting cannot set a variable
        assert missing.status_code == 502
        assert missing.json()["error"]["message"] == (
            f"provider secured: environment variable ${SERVICE_KEY_VAR} is not set"
        )

        places = {}
        for name, service in (("right", right), ("wrong", wrong)):
            record, places[f"the {name} service's store"] = stored(service)
            assert record.status == (200 if name == "right" else 502)
            places[f"the {name} service's command line"] = proc_text(service.process, "cmdline")
        places["the wrong-key service's environment"] = proc_text(wrong.process, "environ")
        places["the sandbox's command line"] = proc_text(provider.process, "cmdline")
    # Logs last: everything each process wrote, flushed by its stop.
    for name, service in (("right", right), ("wrong", wrong)):
        places[f"the {name} service's log"] = service.log.read_text(errors="replace")
        places[f"the {name} service's providers file"] = (
            service.log.parent / "providers.yaml"
        ).read_text()
    places["the sandbox's log"] = provider.log.read_text(errors="replace")
    assert f"${SERVICE_KEY_VAR} is not set" in unset.log.read_text()
    assert "rejected the key" not in places["the right service's log"]
    for where, text in places.items():
        assert PLANTED not in text, f"the key leaked into {where}"
        assert WRONG not in text or where == "the wrong-key service's environment"


def test_offline_evaluation_and_preflight_use_the_providers_file(
    provider: Provider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a release does before any traffic: the candidate's provider is checked, then both
    models answer the suites, over HTTPS with the key from the variable the file names."""
    providers = load_providers(write_providers(tmp_path / "providers.yaml", provider.providers()))
    endpoints = Endpoints(home=str(tmp_path), mlflow_uri="http://127.0.0.1:9", keys_dir="keys")
    keys = generate_keypair(tmp_path / "keys", "ci", [examples.SERVICE])
    spec = ReleaseSpec(service=examples.SERVICE, candidate=sign(manifest(), keys.private_path))
    monkeypatch.setenv(SERVICE_KEY_VAR, PLANTED)
    check = runbook.check_candidate_provider(spec, endpoints, providers)
    assert f"provider secured accepted the key and serves {FAST!r}" in " ".join(check.evidence)
    report = runbook.evaluate_manifests(
        manifest(),
        manifest(),
        ["golden"],
        GatePolicy().offline,
        endpoints,
        sample_per_suite=4,
        providers=providers,
    )
    assert len(report.items) == 4 and report.tokens > 0
    assert not [i for i in report.items if i.candidate_output.startswith(ERROR_PREFIX)]
    assert PLANTED not in report.model_dump_json() + repr(check)
    monkeypatch.setenv(SERVICE_KEY_VAR, WRONG)
    with pytest.raises(ProviderResponseError) as refused:
        runbook.check_candidate_provider(spec, endpoints, providers)
    assert str(refused.value) == (
        f"provider secured rejected the key from ${SERVICE_KEY_VAR} (HTTP 401)"
    )


@pytest.mark.parametrize("kind", ["http1", "aiohttp", "httpx"])
def test_every_forwarder_sends_the_key_over_the_providers_tls(
    provider: Provider, kind: ForwarderKind, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`serve --forwarder` picks one of three clients; each takes the upstream's headers and
    TLS context (the benchmark measures all three on the same path)."""
    monkeypatch.setenv(SERVICE_KEY_VAR, PLANTED)
    upstream = Upstreams(provider.providers().providers).get("secured")
    body = json.dumps({"model": FAST, "messages": [{"role": "user", "content": QUESTION}]})

    async def ask() -> tuple[int, int]:
        forwarder = make_forwarder(kind)
        await forwarder.start()
        try:
            ok = await forwarder.post(
                upstream.url, body.encode(), 5.0, upstream.headers, upstream.tls
            )
            bare = await forwarder.post(upstream.url, body.encode(), 5.0, {}, upstream.tls)
        finally:
            await forwarder.aclose()
        return ok.status, bare.status

    assert asyncio.run(ask()) == (200, 401)
