"""Credentials as references, against a real HTTPS provider that wants a key.

The sandbox runs as its own process with `--tls-cert/--tls-key` (a CA-signed certificate made for
this module) and `--require-key`; the evaluation client and the provider preflight reach it with
the key from an environment variable or a 0600 file. A planted key is then looked for in every
log line, exception text and repr the module produced, in the sandbox's log and on its command
line: it must be in none.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import stat
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from canaryflow import runbook
from canaryflow.contracts import (
    Endpoints,
    GatePolicy,
    ModelManifest,
    Origin,
    PolicyFloor,
    ProviderConfig,
    ProvidersFile,
    ReleaseSpec,
)
from canaryflow.errors import CanaryflowError, ConfigError, ProviderResponseError
from canaryflow.evaluation.harness import ERROR_PREFIX
from canaryflow.local import examples
from canaryflow.local.processes import ManagedProcess, free_port, withhold
from canaryflow.providers.client import ProviderClient
from canaryflow.providers.config import credential_headers, load_providers, resolve_key
from canaryflow.providers.preflight import check_provider
from canaryflow.registry.signing import generate_keypair, sign
from tests.certificates import Certificates, secured_sandbox
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
KEY_VAR = "CANARYFLOW_TEST_PROVIDER_KEY"
PLANTED = f"sk-planted-{secrets.token_hex(12)}"
FAST = "sandbox-base@latency_ms=0,error_rate=0"

# Every text the module showed a person: exception messages and reprs. Searched at the end.
SHOWN: list[str] = []


class Provider:
    def __init__(self, url: str, certs: Certificates, log: Path, process: ManagedProcess) -> None:
        self.url, self.certs, self.log, self.process = url, certs, log, process

    def config(self, **fields: object) -> ProviderConfig:
        values: dict[str, object] = {
            "base_url": f"{self.url}/v1",
            "api_key_env": KEY_VAR,
            "ca_bundle": str(self.certs.ca),
            "timeout_s": 5.0,
        }
        values.update(fields)
        config = ProviderConfig.model_validate(values)
        SHOWN.append(repr(config))
        return config


@pytest.fixture(scope="module")
def provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Provider]:
    with secured_sandbox(tmp_path_factory.mktemp("tls-provider"), KEY_VAR, PLANTED) as sandbox:
        yield Provider(sandbox.url, sandbox.certs, sandbox.log, sandbox.process)


def manifest(model: str = FAST, provider: str = "secured") -> ModelManifest:
    base = examples.manifest("1.0", model)
    return base.model_copy(update={"origin": Origin(provider=provider, model=model)})


def refused(error: type[Exception], call: object) -> str:
    """Run `call` (a function or a coroutine), expect `error`, keep its text for the leak check."""
    with pytest.raises(error) as caught:
        if asyncio.iscoroutine(call):
            asyncio.run(call)
        else:
            call()  # type: ignore[operator]
    text = f"{caught.value}\n{caught.value!r}\n{caught.value.__cause__!r}"
    SHOWN.append(text)
    return str(caught.value)


async def complete(config: ProviderConfig, environ: dict[str, str], model: str = FAST) -> str:
    client = ProviderClient.for_provider("secured", config, environ, max_retries=0)
    SHOWN.append(repr(client) + repr(vars(client)))
    async with client:
        answer = await client.complete(manifest(model), "What is 17 + 25?")
    return answer.text


def providers_of(config: ProviderConfig) -> ProvidersFile:
    return ProvidersFile(providers={"secured": config})


# --------------------------------------------------------------------------- the right key


def test_the_right_bearer_key_over_https_gets_an_answer(provider: Provider) -> None:
    assert "42" in asyncio.run(complete(provider.config(), {KEY_VAR: PLANTED}))


def test_the_api_key_header_style_is_accepted_too(provider: Provider) -> None:
    config = provider.config(auth="api-key")
    assert "api-key" in credential_headers("secured", config, {KEY_VAR: PLANTED})
    assert "42" in asyncio.run(complete(config, {KEY_VAR: PLANTED}))


def test_a_0600_key_file_is_read_at_call_time(provider: Provider, tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.touch(mode=0o600)
    key_file.write_text("wrong-for-now\n")
    config = provider.config(api_key_env=None, api_key_file=str(key_file))
    refused(ProviderResponseError, complete(config, {}))
    key_file.write_text(PLANTED + "\n")  # rotated: the next client reads the new key
    assert "42" in asyncio.run(complete(config, {}))


def test_preflight_lists_the_model_and_retrieves_an_unlisted_override(provider: Provider) -> None:
    providers = providers_of(provider.config())
    listed = check_provider(manifest("sandbox-good"), providers, environ={KEY_VAR: PLANTED})
    SHOWN.append(repr(listed))
    assert listed.evidence[-1] == "provider secured accepted the key and lists 'sandbox-good'"
    retrieved = check_provider(manifest(FAST), providers, environ={KEY_VAR: PLANTED})
    assert "serves" in retrieved.evidence[-1]
    missing = refused(
        ProviderResponseError,
        lambda: check_provider(manifest("gpt-nope"), providers, environ={KEY_VAR: PLANTED}),
    )
    assert missing.startswith("provider secured does not offer model 'gpt-nope'")
    assert "sandbox-base" in missing


# --------------------------------------------------------------------------- refusals


def test_a_wrong_key_stops_preflight_and_the_client_with_one_sentence(provider: Provider) -> None:
    providers = providers_of(provider.config())
    sentence = f"provider secured rejected the key from ${KEY_VAR} (HTTP 401)"
    wrong = {KEY_VAR: "sk-wrong-" + secrets.token_hex(8)}

    def preflight() -> object:
        return check_provider(manifest(), providers, environ=wrong)

    assert refused(ProviderResponseError, preflight) == sentence
    assert refused(ProviderResponseError, complete(provider.config(), wrong)) == sentence
    without_key = provider.config(api_key_env=None, auth="none")
    assert refused(ProviderResponseError, complete(without_key, {})) == (
        "provider secured refused a request without a key (HTTP 401): name one with "
        "api_key_env or api_key_file in the providers file"
    )


def test_a_missing_environment_variable_is_named(provider: Provider) -> None:
    providers = providers_of(provider.config())
    message = refused(ConfigError, lambda: check_provider(manifest(), providers, environ={}))
    assert message == f"provider secured: environment variable ${KEY_VAR} is not set"


def test_key_files_that_are_unreadable_or_shared_are_refused(
    provider: Provider, tmp_path: Path
) -> None:
    absent = provider.config(api_key_env=None, api_key_file=str(tmp_path / "absent"))
    message = refused(ConfigError, lambda: resolve_key("secured", absent))
    assert message.startswith(f"provider secured: key file {tmp_path / 'absent'} is unreadable")
    shared = tmp_path / "shared"
    shared.write_text(PLANTED)
    shared.chmod(0o644)
    config = provider.config(api_key_env=None, api_key_file=str(shared))
    message = refused(ConfigError, lambda: resolve_key("secured", config))
    assert f"key file {shared} is readable by others (mode 644): chmod 600" in message
    assert refused(ConfigError, complete(config, {})) == message


def test_an_unknown_provider_names_the_configured_ones(provider: Provider) -> None:
    providers = providers_of(provider.config())

    def preflight() -> object:
        return check_provider(manifest(provider="nope"), providers, source="providers.yaml")

    message = refused(ConfigError, preflight)
    assert message.startswith("provider 'nope' is not configured in providers.yaml")
    assert "(configured: secured)" in message


def test_an_untrusted_certificate_is_a_tls_error_not_a_key_error(provider: Provider) -> None:
    """Without the CA bundle the system's CAs are used, and they do not know the test CA."""
    providers = providers_of(provider.config(ca_bundle=None))
    message = refused(
        ConfigError, lambda: check_provider(manifest(), providers, environ={KEY_VAR: PLANTED})
    )
    assert "failed TLS verification" in message and "set ca_bundle" in message


def test_a_provider_without_a_model_list_is_not_a_failure() -> None:
    async def chat(request: Request) -> JSONResponse:
        return JSONResponse({"error": "only chat here"}, status_code=400)

    port = free_port()
    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for("the bare provider", lambda: server.started)
        config = ProviderConfig(base_url=f"http://127.0.0.1:{port}/v1", auth="none")
        check = check_provider(manifest(), providers_of(config))
    finally:
        server.should_exit = True
        thread.join(timeout=5)
    assert "offers no model list (/models: HTTP 404): not a failure" in check.evidence[-1]


# --------------------------------------------------------------------------- no leak


def test_the_planted_key_is_in_no_log_error_repr_or_command_line(
    provider: Provider, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """Run alone or after the others: the refusals below have the planted key in play."""
    with caplog.at_level(logging.DEBUG):
        asyncio.run(complete(provider.config(), {KEY_VAR: PLANTED}))
        config = provider.config()
        SHOWN.append(repr(resolve_key("secured", config, {KEY_VAR: PLANTED})))
        SHOWN.append(str(resolve_key("secured", config, {KEY_VAR: PLANTED})))
        untrusted = providers_of(provider.config(ca_bundle=None))
        refused(
            ConfigError, lambda: check_provider(manifest(), untrusted, environ={KEY_VAR: PLANTED})
        )
        refused(ProviderResponseError, complete(provider.config(), {KEY_VAR: PLANTED + "x"}))
        shared = tmp_path / "shared.key"
        shared.write_text(PLANTED)
        shared.chmod(0o640)
        refused(
            ConfigError, complete(provider.config(api_key_env=None, api_key_file=str(shared)), {})
        )
        literal = tmp_path / "providers.yaml"
        literal.write_text(
            f"providers:\n  p:\n    base_url: {provider.url}/v1\n    api_key: {PLANTED}\n"
        )
        refused(ConfigError, lambda: load_providers(literal))
    assert provider.process.process is not None
    pid = provider.process.process.pid
    command_line = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    places = {
        "log records": "\n".join(r.getMessage() for r in caplog.records),
        "exception texts and reprs": "\n".join(SHOWN),
        "the sandbox's log": provider.log.read_text(errors="replace"),
        "the sandbox's command line": command_line,
    }
    assert len(SHOWN) >= 8
    for where, text in places.items():
        assert PLANTED not in text, f"the key leaked into {where}"
    assert not os.environ.get(KEY_VAR), "the test never put the key in its own environment"
    assert issubclass(ProviderResponseError, CanaryflowError)


# --------------------------------------------------------------------------- in the runbook


def test_runbook_preflight_refuses_a_wrong_key_before_the_registry(
    provider: Provider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow is nowhere (port 9): the refusal comes before any registry call, so no alias
    can have moved. Without a providers file the stack's bare URLs are checked, keyless."""
    keys = generate_keypair(tmp_path / "keys", "ci", [examples.SERVICE])
    spec = ReleaseSpec(
        service=examples.SERVICE, candidate=sign(manifest("sandbox-good"), keys.private_path)
    )
    endpoints = Endpoints(
        home=str(tmp_path),
        mlflow_uri="http://127.0.0.1:9",
        keys_dir=str(tmp_path / "keys"),
        provider_urls={"secured": provider.url},
    )
    providers = providers_of(provider.config())
    monkeypatch.setenv(KEY_VAR, "sk-wrong-" + secrets.token_hex(8))
    with pytest.raises(ProviderResponseError) as wrong:
        runbook.preflight(spec, endpoints, PolicyFloor(), providers=providers)
    assert str(wrong.value) == f"provider secured rejected the key from ${KEY_VAR} (HTTP 401)"
    with pytest.raises(ConfigError, match="failed TLS verification"):
        runbook.preflight(spec, endpoints, PolicyFloor())  # bare URL: the system's CAs
    elsewhere = endpoints.model_copy(update={"provider_urls": {}})
    with pytest.raises(ConfigError, match="not configured in the stack's provider_urls"):
        runbook.preflight(spec, elsewhere, PolicyFloor())


def test_runbook_evaluates_offline_over_https_with_the_key(
    provider: Provider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The offline gate's client is the providers file's entry: key, CA bundle, limits. Without
    the file, a provider the stack does not know is named in one sentence."""
    endpoints = Endpoints(
        home=str(tmp_path),
        mlflow_uri="http://127.0.0.1:9",
        keys_dir=str(tmp_path),
        provider_urls={"secured": provider.url},
    )
    monkeypatch.setenv(KEY_VAR, PLANTED)
    report = runbook.evaluate_manifests(
        manifest(),
        manifest(),
        ["golden"],
        GatePolicy().offline,
        endpoints,
        sample_per_suite=3,
        providers=providers_of(provider.config()),
    )
    assert len(report.items) == 3 and report.tokens > 0
    assert not [i for i in report.items if i.candidate_output.startswith(ERROR_PREFIX)]
    elsewhere = endpoints.model_copy(update={"provider_urls": {}})
    message = refused(
        ConfigError,
        lambda: runbook.evaluate_manifests(
            manifest(), manifest(), ["golden"], GatePolicy().offline, elsewhere
        ),
    )
    assert "provider 'secured' is not configured in the stack's provider_urls" in message
    assert "CANARYFLOW_PROVIDER_URLS" not in message


# --------------------------------------------------------------------------- children


def test_a_withheld_key_reaches_only_the_servers_that_need_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stack withholds its providers' key variables: a server inherits them only when it
    names them in `needs` (the model services); every other one (Prefect, MLflow, Envoy...)
    starts without them, while the rest of the environment still reaches it."""
    variable = "CANARYFLOW_TEST_WITHHELD_KEY"
    monkeypatch.setenv(variable, PLANTED)
    monkeypatch.setenv("CANARYFLOW_TEST_ORDINARY", "kept")
    withhold({variable})
    script = (
        "import os, sys, time\n"
        f"print(os.environ.get({variable!r}, 'absent'), os.environ.get('CANARYFLOW_TEST_ORDINARY'),"
        " flush=True)\ntime.sleep(60)\n"
    )
    seen = {}
    for name, needs in (("other", ()), ("service", (variable,))):
        log = tmp_path / f"{name}.log"
        process = ManagedProcess(
            name=name,
            command=[sys.executable, "-c", script],
            log_path=log,
            ready=lambda log=log: log.exists() and bool(log.read_text().strip()),
            needs=needs,
        )
        process.start(timeout_s=10)
        try:
            assert process.process is not None
            environ = Path(f"/proc/{process.process.pid}/environ").read_bytes().decode()
            seen[name] = (log.read_text().split(), PLANTED in environ)
        finally:
            process.stop()
    assert seen["other"] == (["absent", "kept"], False)
    assert seen["service"] == ([PLANTED, "kept"], True)


def test_the_request_store_and_the_answer_cache_are_owner_only(tmp_path: Path) -> None:
    """Both hold prompts and answers; SQLite would make them with the umask's mode (0644)."""
    from canaryflow.dataplane.store import Store
    from canaryflow.providers.cache import ResponseCache

    with Store(f"sqlite:///{tmp_path / 'store.db'}") as store:
        store.records(examples.SERVICE, datetime.now(UTC), datetime.now(UTC))
    ResponseCache(tmp_path / "cache.db").close()
    shared = tmp_path / "old.db"
    shared.touch(mode=0o644)
    shared.chmod(0o644)  # made by an older version
    ResponseCache(shared).close()
    made = sorted(p.name for p in tmp_path.iterdir())
    assert {"store.db", "cache.db", "old.db"} <= set(made)
    for path in tmp_path.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, f"{path.name}: {path.stat().st_mode:o}"
