"""Trust pinned server-side, as it runs: a real MLflow registry, a real model service process
(started as the embedded stack starts it, with `--keys-dir`), a real Envoy in front of it and a
real Prefect server that asks for HTTP basic auth.

What must hold: a manifest edited in the registry after publishing, or signed by a trusted key
bound to another service, is never served (the request gets a 503 that says why, and the error
counts), is refused at preflight, and `rollback --to` it stops before any traffic moves.

Figures (`-s` shows them): the cost of verification, paid once per version load.
"""

from __future__ import annotations

import asyncio
import base64
import statistics
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

from canaryflow import connections, runbook
from canaryflow.contracts import Endpoints, ModelManifest, PolicyFloor, ReleaseSpec, SignedManifest
from canaryflow.dataplane.resolver import CachedResolver, mlflow_fetchers
from canaryflow.errors import SignatureError
from canaryflow.local import examples
from canaryflow.local.envoy import EnvoyProxy
from canaryflow.local.processes import ManagedProcess, free_port
from canaryflow.local.stack import (
    admin_url_of,
    mlflow_server,
    model_service,
    prefect_server,
    sandbox_server,
    url_of,
)
from canaryflow.registry.signing import (
    KeyNotAllowedError,
    generate_keypair,
    load_trusted_keys,
    sign,
    verify,
)
from canaryflow.registry.versions import MANIFEST_PATH, TAG_DIGEST, MlflowRegistry
from canaryflow.settings import pinned_endpoints

SERVICE = examples.SERVICE
AUTH = "canaryflow:trust-faults-pass"


def figure(text: str) -> None:
    print(f"FIGURE {text}")


@dataclass
class Trust:
    endpoints: Endpoints
    registry: MlflowRegistry
    key: Path  # bound to SERVICE
    other_key: Path  # trusted, bound to another service only
    champion: str
    service_url: str
    prefect_url: str
    service_admin_url: str  # warm-up and metrics: not on the public port


def authenticated_prefect(home: Path) -> ManagedProcess:
    """The stack's Prefect server, with HTTP basic auth on its API."""
    server = prefect_server(home, ui=False)
    server.env["PREFECT_SERVER_API_AUTH_STRING"] = AUTH
    return server


@pytest.fixture(scope="module")
def trust(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trust]:
    home = tmp_path_factory.mktemp("trust")
    keys_dir = home / "keys"
    key = generate_keypair(keys_dir, "ci", [SERVICE])
    other = generate_keypair(keys_dir, "support-ci", ["support-bot"])
    mlflow, sandbox, prefect = (
        mlflow_server(home),
        sandbox_server(home),
        authenticated_prefect(home),
    )
    started: list[ManagedProcess | EnvoyProxy] = []
    try:
        with ThreadPoolExecutor(3) as pool:
            started.extend(pool.map(lambda p: p.start(120), (mlflow, sandbox, prefect)))
        endpoints = Endpoints(
            home=str(home),
            mlflow_uri=url_of(mlflow),
            prefect_api_url=f"{url_of(prefect)}/api",
            provider_urls={"sandbox": url_of(sandbox)},
            keys_dir=str(keys_dir),
            store_url=f"sqlite:///{home / 'store.db'}",
        )
        registry = MlflowRegistry(endpoints.mlflow_uri)
        champion = registry.publish(
            sign(examples.manifest("1.1", "sandbox-base"), key.private_path)
        )
        registry.promote(SERVICE, champion.version)
        service = model_service(home, "primary", SERVICE, endpoints)
        assert "--keys-dir" in service.command, "the stack passes its keys folder to the service"
        started.append(service.start(60))
        port = int(url_of(service).rsplit(":", 1)[1])
        envoy = EnvoyProxy(
            home / "envoy",
            service=SERVICE,
            listen_port=free_port(),
            admin_port=free_port(),
            upstreams={k: ("127.0.0.1", port) for k in ("stable", "canary", "shadow")},
            initial_stable=champion.version,
        )
        envoy.start(60)
        started.append(envoy)
        endpoints = endpoints.model_copy(
            update={
                "envoy_url": envoy.url,
                "envoy_admin_url": envoy.admin_url,
                "envoy_home": str(envoy.home),
                "model_service_urls": [url_of(service)],
                "model_service_admin_urls": [admin_url_of(service)],
            }
        )
        yield Trust(
            endpoints,
            registry,
            key.private_path,
            other.private_path,
            champion.version,
            url_of(service),
            url_of(prefect),
            admin_url_of(service),
        )
    finally:
        for process in reversed(started):
            process.stop()


# --------------------------------------------------------------------------- helpers


def chat(url: str, version: str | None = None) -> httpx.Response:
    headers = {"x-canaryflow-version": version} if version else {}
    body = {"messages": [{"role": "user", "content": "What is the capital of France?"}]}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=30)


def registry_errors(trust: Trust) -> float:
    text = httpx.get(f"{trust.service_admin_url}/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith("canaryflow_registry_errors_total"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def publish(trust: Trust, signed: SignedManifest) -> str:
    """Published as `canaryflow publish` would, minus its check: the registry is not the guard."""
    return trust.registry.publish(signed).version


def tamper(trust: Trust, version: str, digest_tag_too: bool) -> SignedManifest:
    """Edit the stored manifest behind canaryflow's back (an MLflow user with write access):
    the model now points at another provider model, the signature is the original one. With
    `digest_tag_too` the digest tag is rewritten to match, so only the signature can tell."""
    found = trust.registry.get(SERVICE, version)
    original = found.signed
    edited = ModelManifest.model_validate(
        {
            **original.manifest.model_dump(),
            "origin": {"provider": "sandbox", "model": "sandbox-hallucinating"},
        }
    )
    forged = SignedManifest(manifest=edited, signature=original.signature)
    trust.registry.client.log_dict(found.run_id, forged.model_dump(mode="json"), MANIFEST_PATH)
    if digest_tag_too:
        trust.registry.set_tags(SERVICE, version, {TAG_DIGEST: edited.digest()})
    return original


def restore(trust: Trust, version: str, original: SignedManifest) -> None:
    run_id = trust.registry.client.get_model_version(SERVICE, version).run_id
    trust.registry.client.log_dict(run_id, original.model_dump(mode="json"), MANIFEST_PATH)
    trust.registry.set_tags(SERVICE, version, {TAG_DIGEST: original.manifest.digest()})


# --------------------------------------------------------------------------- the model service


def test_the_champion_is_served_after_verification(trust: Trust) -> None:
    r = chat(trust.service_url, trust.champion)
    assert r.status_code == 200, r.text
    assert r.headers["x-canaryflow-version"] == trust.champion


@pytest.mark.parametrize(
    "digest_tag_too, reason",
    [(False, "changed in the registry"), (True, "changed after it was signed")],
    ids=["artifact-only", "artifact-and-digest-tag"],
)
def test_a_manifest_tampered_in_mlflow_is_never_served(
    trust: Trust, digest_tag_too: bool, reason: str
) -> None:
    manifest = examples.manifest("1.2", "sandbox-good", seed=10 + int(digest_tag_too))
    version = publish(trust, sign(manifest, trust.key))
    original = tamper(trust, version, digest_tag_too)
    errors_before = registry_errors(trust)

    refused = chat(trust.service_url, version)

    assert refused.status_code == 503, refused.text
    message = refused.json()["error"]["message"]
    assert f"refusing to serve version {version!r}" in message
    assert "failed verification" in message and reason in message
    assert "choices" not in refused.json(), "nothing was generated for it"
    assert registry_errors(trust) > errors_before, "the refusal counts as a registry error"
    # Asked again at once: still refused (the failure is remembered for retry_s, not served).
    assert chat(trust.service_url, version).status_code == 503

    # Not cached forever: once the stored manifest is good again, it is served, no restart.
    restore(trust, version, original)
    deadline = time.monotonic() + 10
    while (served := chat(trust.service_url, version)).status_code != 200:
        assert time.monotonic() < deadline, served.text
        time.sleep(0.2)
    assert served.headers["x-canaryflow-version"] == version


def test_a_manifest_signed_by_a_key_bound_to_another_service_is_not_served(trust: Trust) -> None:
    signed = sign(examples.manifest("1.3", "sandbox-good"), trust.other_key)
    version = publish(trust, signed)

    refused = chat(trust.service_url, version)

    assert refused.status_code == 503, refused.text
    message = refused.json()["error"]["message"]
    assert "KeyNotAllowedError" in message
    assert f"for service '{SERVICE}'" in message and "may sign only for support-bot" in message


def test_the_warm_up_call_is_refused_too(trust: Trust) -> None:
    """`/admin/warm` (called before traffic moves) resolves through the same check."""
    version = publish(trust, sign(examples.manifest("1.4", "sandbox-good"), trust.other_key))
    r = httpx.post(f"{trust.service_admin_url}/admin/warm", json={"version": version}, timeout=30)
    assert r.status_code == 503 and "failed verification" in r.json()["error"]


# --------------------------------------------------------------------------- release and rollback


def test_preflight_refuses_a_key_bound_to_another_service(trust: Trust) -> None:
    signed = sign(examples.manifest("1.5", "sandbox-good"), trust.other_key)
    spec = ReleaseSpec(service=SERVICE, candidate=signed)
    aliases = trust.registry.aliases(SERVICE)
    with pytest.raises(KeyNotAllowedError, match="may sign only for support-bot"):
        runbook.preflight(spec, trust.endpoints, PolicyFloor())
    assert trust.registry.aliases(SERVICE) == aliases


def test_rollback_to_a_tampered_version_stops_before_traffic_moves(trust: Trust) -> None:
    from flows.rollback import rollback

    controller = connections.traffic_controller(trust.endpoints, SERVICE)
    routes_before = controller.current()
    good = publish(trust, sign(examples.manifest("1.6", "sandbox-good"), trust.key))
    bad = publish(trust, sign(examples.manifest("1.7", "sandbox-good"), trust.key))
    tamper(trust, bad, digest_tag_too=True)
    champion = trust.registry.aliases(SERVICE)["champion"]
    settings = {PREFECT_API_URL: trust.endpoints.prefect_api_url, PREFECT_API_AUTH_STRING: AUTH}

    with temporary_settings(updates=settings), pinned_endpoints(trust.endpoints):
        with pytest.raises(SignatureError, match="changed after it was signed"):
            rollback(SERVICE, to_version=bad, reason="test")
        assert controller.current() == routes_before, "no traffic moved"
        assert trust.registry.aliases(SERVICE)["champion"] == champion
        through_envoy = chat(str(trust.endpoints.envoy_url))
        assert through_envoy.status_code == 200
        assert through_envoy.headers["x-canaryflow-version"] == champion

        # The same flow with a good target moves traffic: the refusal above was the check.
        summary = rollback(SERVICE, to_version=good, reason="test")
    assert summary["champion"] == good
    after = controller.current()
    assert after is not None and after.stable == good


# --------------------------------------------------------------------------- Prefect's API auth


def test_prefect_api_refuses_a_client_without_the_auth_string(trust: Trust) -> None:
    api = f"{trust.prefect_url}/api"
    body = {"limit": 1}
    assert httpx.post(f"{api}/flow_runs/filter", json=body, timeout=10).status_code == 401
    wrong = httpx.post(f"{api}/flow_runs/filter", json=body, auth=("canaryflow", "no"), timeout=10)
    assert wrong.status_code == 401
    user, password = AUTH.split(":", 1)
    right = httpx.post(f"{api}/flow_runs/filter", json=body, auth=(user, password), timeout=10)
    assert right.status_code == 200, right.text
    token = base64.b64encode(AUTH.encode()).decode()  # what PREFECT_API_AUTH_STRING sends
    assert right.request.headers["authorization"] == f"Basic {token}"
    # The readiness probe stays open (the stack's own start-up check uses it).
    assert httpx.get(f"{api}/health", timeout=10).status_code == 200


def test_prefect_client_needs_prefect_api_auth_string(trust: Trust) -> None:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import PrefectHTTPStatusError

    api = f"{trust.prefect_url}/api"
    without = {PREFECT_API_URL: api}
    with (
        temporary_settings(updates=without),
        get_client(sync_client=True) as client,
        pytest.raises(PrefectHTTPStatusError, match="401"),
    ):
        client.read_flow_runs(limit=1)
    with_auth = {PREFECT_API_URL: api, PREFECT_API_AUTH_STRING: AUTH}
    with temporary_settings(updates=with_auth), get_client(sync_client=True) as client:
        assert isinstance(client.read_flow_runs(limit=1), list)


def test_the_webhook_starts_releases_on_a_prefect_api_with_auth(
    trust: Trust, tmp_path: Path
) -> None:
    """The receiver sends PREFECT_API_AUTH_STRING as Prefect's client does; without it the
    delivery is answered 503 with the variable to set, and no run starts."""
    from prefect.client.orchestration import get_client

    from tests.faults.test_webhook_faults import post, signed, start_receiver

    api = f"{trust.prefect_url}/api"
    with (
        temporary_settings(updates={PREFECT_API_URL: api, PREFECT_API_AUTH_STRING: AUTH}),
        get_client(sync_client=True) as client,
    ):
        flow_id = client.create_flow_from_name("release")
        client.create_deployment(flow_id=flow_id, name="release")
        runs_before = len(client.read_flow_runs())
        keys = generate_keypair(tmp_path / "keys", "ci", [SERVICE])
        spec = {
            "service": SERVICE,
            "candidate": sign(examples.manifest("3.1", "sandbox-good"), keys.private_path)
            .model_dump(mode="json"),
        }  # fmt: skip
        bare = start_receiver(tmp_path / "bare", api, tmp_path)
        try:
            refused = post(bare, signed(spec))
        finally:
            bare.process.stop()
        assert refused.status_code == 503, refused.text
        assert "PREFECT_API_AUTH_STRING" in refused.json()["error"]
        assert len(client.read_flow_runs()) == runs_before, "no run without credentials"

        authed = start_receiver(
            tmp_path / "authed", api, tmp_path, env={"PREFECT_API_AUTH_STRING": AUTH}
        )
        try:
            accepted = post(authed, signed(spec))
            command_line = " ".join(authed.process.command)
        finally:
            authed.process.stop()
        assert accepted.status_code == 202, accepted.text
        run = client.read_flow_run(accepted.json()["flow_run_id"])
        assert run.parameters["spec"]["service"] == SERVICE
        assert "endpoints" not in run.parameters, "trust comes from the worker, not the delivery"
    assert AUTH.split(":", 1)[1] not in command_line, "the password is never on the command line"


def test_no_flow_takes_its_endpoints_or_trust_store_as_a_parameter() -> None:
    """Anyone reaching the Prefect API may set a run's parameters: none of them may name the
    parts a release trusts (keys, registry, routes). Flows read the worker's own settings."""
    from prefect.utilities.callables import parameter_schema

    from flows.nightly_eval import nightly_eval
    from flows.release import release
    from flows.rollback import rollback

    for flow in (release, rollback, nightly_eval):
        names = set(parameter_schema(flow.fn).properties)
        assert not names & {"endpoints", "keys_dir", "mlflow_uri", "envoy_home"}, (flow, names)


# --------------------------------------------------------------------------- the cost


def test_verification_is_paid_once_per_version_load_not_per_request(trust: Trust) -> None:
    keys_dir = Path(trust.endpoints.keys_dir)
    fetch, _ = mlflow_fetchers(trust.endpoints.mlflow_uri, keys_dir)
    loads = 0

    def counting(service: str, version: str) -> ModelManifest:
        nonlocal loads
        loads += 1
        return fetch(service, version)

    async def resolve_many(n: int) -> list[float]:
        resolver = CachedResolver(counting, ttl_s=60)
        took = []
        for _ in range(n):
            t0 = time.perf_counter()
            await resolver.manifest(SERVICE, trust.champion)
            took.append(time.perf_counter() - t0)
        await resolver.aclose()
        return took

    took = asyncio.run(resolve_many(1000))
    assert loads == 1, "one fetch (and one verification) for 1000 lookups"

    signed = trust.registry.get(SERVICE, trust.champion).signed
    verify_s = []
    for _ in range(200):
        t0 = time.perf_counter()
        verify(signed, load_trusted_keys(keys_dir))
        verify_s.append(time.perf_counter() - t0)
    fetch_s = []
    for verified in (False, True, False, True, False, True):
        t0 = time.perf_counter()
        if verified:
            fetch(SERVICE, trust.champion)
        else:
            trust.registry.get(SERVICE, trust.champion)
        fetch_s.append((verified, time.perf_counter() - t0))
    plain = statistics.median(s for v, s in fetch_s if not v)
    checked = statistics.median(s for v, s in fetch_s if v)
    figure(
        f"verification (read {len(load_trusted_keys(keys_dir))} keys + bindings, ed25519 "
        f"verify): median {statistics.median(verify_s) * 1e6:.0f} us per version load"
    )
    figure(
        f"version load from MLflow: {plain * 1e3:.1f} ms unverified, {checked * 1e3:.1f} ms "
        "verified (median of 3)"
    )
    figure(
        f"1000 lookups of one version: first {took[0] * 1e3:.1f} ms, then median "
        f"{statistics.median(took[1:]) * 1e6:.1f} us (cached; no verification)"
    )
    assert statistics.median(verify_s) < 0.05


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-s", "-q"]))
