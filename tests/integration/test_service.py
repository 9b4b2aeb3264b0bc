"""The model service over real HTTP: a real sandbox provider, a real uvicorn server running the
service, a tiny real HTTP server standing in for a tool endpoint and for a recording provider.

The registry is injected as a `fetch` callable over literal manifests (the resolver's injection
point), so an outage can be switched on and off.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from canaryflow.contracts import DecodingParameters, ModelManifest, Origin, Price
from canaryflow.dataplane.resolver import CachedResolver
from canaryflow.dataplane.service import ServiceConfig, build_app
from canaryflow.dataplane.store import hash_user
from canaryflow.errors import TransientRegistryError
from canaryflow.local.processes import ManagedProcess, free_port, http_ok
from tests.waiting import wait_for

SERVICE = "my-assistant"
FAST = "@latency_ms=0,sigma=0,error_rate=0"
TEMPLATE = "You are a helpful docs assistant. Answer briefly.\n\nQuestion: {input}"


def manifest(model: str, *, provider: str = "sandbox", template: str = TEMPLATE) -> ModelManifest:
    return ModelManifest(
        model_id=f"{SERVICE}/sandbox-docs-v1.0+ds-1",
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
        origin=Origin(provider=provider, model=model),
        prompt_template=template,
        parameters=DecodingParameters(temperature=0.3, top_p=0.9, max_tokens=77, seed=11),
        tokenizer_version="t1",
        embedding_version="e1",
        license="apache-2.0",
        price=Price(input_per_1k=0.5, output_per_1k=1.5),
    )


MANIFESTS = {
    "1": manifest(f"sandbox-base{FAST}"),
    "2": manifest(f"sandbox-good{FAST}"),
    "3": manifest(f"sandbox-base{FAST},hallucination=1.0"),
    "4": manifest(f"sandbox-base{FAST},rate_429=1.0,retry_after=2"),
    "5": manifest("recorded-model", provider="recorder", template="<<{input}>> (v5)"),
    "6": manifest("sandbox-base@latency_ms=3000,sigma=0,error_rate=0"),
}


class Registry:
    """The injection point: a fetch over literal manifests that can be switched off."""

    def __init__(self) -> None:
        self.down = False
        self.calls = 0

    def fetch(self, service: str, version: str) -> ModelManifest:
        self.calls += 1
        if self.down:
            raise TransientRegistryError("registry unreachable (switched off by the test)")
        if service != SERVICE or version not in MANIFESTS:
            raise LookupError(f"{service} has no version {version}")
        return MANIFESTS[version]


# --------------------------------------------------------------------------- fixtures


class _Handler(BaseHTTPRequestHandler):
    disable_nagle_algorithm = True
    tool_calls: list[bytes] = []  # noqa: RUF012
    provider_requests: list[dict[str, Any]] = []  # noqa: RUF012

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        if self.path.startswith("/tools/"):
            type(self).tool_calls.append(body)
            answer: dict[str, Any] = {"ok": True}
        else:
            type(self).provider_requests.append(json.loads(body))
            answer = {
                "id": "rec-1",
                "object": "chat.completion",
                "model": "recorded-model",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12},
            }
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def helper_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = ManagedProcess(
        "sandbox",
        [sys.executable, "-m", "canaryflow.sandbox", "--host", "127.0.0.1", "--port", str(port)],
        tmp_path_factory.mktemp("sandbox") / "sandbox.log",
        http_ok(f"{url}/health"),
    ).start(timeout_s=30)
    yield url
    process.stop()


class ServiceUnderTest:
    def __init__(self, urls: tuple[str, str], registry: Registry, store: Any) -> None:
        self.url, self.admin_url = urls
        self.registry = registry
        self.store = store
        self.client = httpx.Client(base_url=self.url, timeout=10)
        self.admin = httpx.Client(base_url=self.admin_url, timeout=10)

    def chat(
        self, text: str, headers: dict[str, str] | None = None, **extra: Any
    ) -> httpx.Response:
        body = {"model": "canaryflow", "messages": [{"role": "user", "content": text}], **extra}
        return self.client.post("/v1/chat/completions", json=body, headers=headers or {})

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels`."""
        total = 0.0
        for line in self.admin.get("/metrics").text.splitlines():
            if not line.startswith(name + "{"):
                continue
            series, value = line.rsplit(" ", 1)
            if all(f'{k}="{v}"' in series for k, v in labels.items()):
                total += float(value)
        return total


@pytest.fixture(scope="module")
def service(
    sandbox: str, helper_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceUnderTest]:
    from canaryflow.dataplane.store import Store

    store = Store(str(tmp_path_factory.mktemp("store") / "records.db"))
    registry = Registry()
    config = ServiceConfig(
        service=SERVICE,
        provider_urls={"sandbox": sandbox, "recorder": helper_server},
        default_version="1",
        check_sample=1.0,
        tool_urls={"create_ticket": f"{helper_server}/tools/create_ticket"},
        shadow_timeout_s=0.5,
        flush_every_s=0.05,
    )
    resolver = CachedResolver(registry.fetch, ttl_s=0.2, retry_s=0.05)
    with running(build_app(config, resolver=resolver, store=store)) as urls:
        yield ServiceUnderTest(urls, registry, store)
    store.close()


@contextmanager
def running(app: Any) -> Iterator[tuple[str, str]]:
    """Serve `app` (public) and `app.admin` with uvicorn on free ports in threads of this
    process; yields both URLs."""
    ports = free_port(), free_port()
    servers = [
        uvicorn.Server(
            uvicorn.Config(
                served, host="127.0.0.1", port=port, log_level="warning", access_log=False,
                lifespan=lifespan,
            )
        )
        for served, port, lifespan in ((app, ports[0], "on"), (app.admin, ports[1], "off"))
    ]  # fmt: skip
    threads = [threading.Thread(target=server.run, daemon=True) for server in servers]
    for thread in threads:
        thread.start()
    try:
        for port in ports:
            wait_for("the service's /health", http_ok(f"http://127.0.0.1:{port}/health"), 15)
        yield f"http://127.0.0.1:{ports[0]}", f"http://127.0.0.1:{ports[1]}"
    finally:
        for server in servers:
            server.should_exit = True
        for thread in threads:
            thread.join(timeout=10)


# --------------------------------------------------------------------------- tests


def test_health_and_models_answer(service: ServiceUnderTest) -> None:
    assert service.client.get("/health").status_code == 200
    models = service.client.get("/v1/models").json()
    assert f"{SERVICE}@1" in [m["id"] for m in models["data"]]


def test_role_and_version_come_from_envoy_headers(service: ServiceUnderTest) -> None:
    r = service.chat(
        "What is the capital of France?",
        {"x-canaryflow-role": "canary", "x-canaryflow-version": "2", "x-request-id": "req-a"},
    )
    assert r.status_code == 200, r.text
    assert r.headers["x-canaryflow-role"] == "canary"
    assert r.headers["x-canaryflow-version"] == "2"
    assert r.headers["x-request-id"] == "req-a"
    assert r.json()["model"].startswith("sandbox-good")


def test_shadow_host_makes_a_shadow_of_the_shadow_version(service: ServiceUnderTest) -> None:
    r = service.chat(
        "What is the capital of France?",
        {
            "host": "my-assistant:10000-shadow",
            "x-canaryflow-mirror": "1",
            "x-canaryflow-role": "stable",  # Envoy copies the primary cluster's headers
            "x-canaryflow-version": "1",
            "x-canaryflow-shadow-version": "2",
        },
    )
    assert r.status_code == 200, r.text
    assert (r.headers["x-canaryflow-role"], r.headers["x-canaryflow-version"]) == ("shadow", "2")
    assert r.json()["model"].startswith("sandbox-good")


def test_a_shadow_host_without_envoys_mirror_header_is_refused(service: ServiceUnderTest) -> None:
    headers = {"host": "my-assistant-shadow", "x-canaryflow-shadow-version": "2"}
    r = service.chat("What is the capital of France?", headers)
    assert r.status_code == 400
    assert "x-canaryflow-mirror" in r.json()["error"]["message"]


def test_admin_routes_are_on_the_admin_listener_only(service: ServiceUnderTest) -> None:
    assert service.client.get("/metrics").status_code == 404
    assert service.client.post("/admin/warm", json={"version": "1"}).status_code == 404
    assert service.admin.get("/metrics").status_code == 200
    warmed = service.admin.post("/admin/warm", json={"version": "2"})
    assert warmed.status_code == 200, warmed.text
    assert service.admin.post("/admin/warm", content=b"{not json").status_code == 400


def test_a_body_over_the_limit_is_413_and_not_echoed(service: ServiceUnderTest) -> None:
    secret = "do-not-echo-" + "x" * (1024 * 1024)
    r = service.chat(secret)  # a declared Content-Length over 1 MiB
    assert r.status_code == 413
    assert "1048576 bytes" in r.text and "--max-body-bytes" in r.text
    assert "do-not-echo" not in r.text

    def chunks() -> Iterator[bytes]:  # no Content-Length: read up to the cap, then refused
        yield b'{"messages": [{"role": "user", "content": "do-not-echo'
        for _ in range(40):
            yield b"y" * 65536

    r = service.client.post("/v1/chat/completions", content=chunks())
    assert r.status_code == 413 and "do-not-echo" not in r.text


def test_direct_call_is_stable_of_the_default_version(service: ServiceUnderTest) -> None:
    r = service.chat("What is the capital of France?")
    assert r.status_code == 200, r.text
    assert (r.headers["x-canaryflow-role"], r.headers["x-canaryflow-version"]) == ("stable", "1")
    assert len(r.headers["x-request-id"]) >= 16


def test_template_and_parameters_reach_the_provider(service: ServiceUnderTest) -> None:
    _Handler.provider_requests.clear()
    r = service.chat(
        "hello there",
        {"x-canaryflow-version": "5"},
        temperature=1.9,  # the client's own decoding parameters do not override the release's
    )
    assert r.status_code == 200, r.text
    (sent,) = _Handler.provider_requests
    assert sent["model"] == "recorded-model"
    assert sent["messages"][-1] == {"role": "user", "content": "<<hello there>> (v5)"}
    assert (sent["temperature"], sent["top_p"], sent["max_tokens"], sent["seed"]) == (
        0.3,
        0.9,
        77,
        11,
    )


def test_metrics_carry_service_version_and_role(service: ServiceUnderTest) -> None:
    service.chat(
        "What is the capital of Spain?",
        {"x-canaryflow-role": "canary", "x-canaryflow-version": "2"},
    )
    labels = {"service": SERVICE, "version": "2", "role": "canary"}
    assert service.metric("canaryflow_requests_total", status="200", **labels) >= 1
    assert service.metric("canaryflow_request_duration_seconds_count", **labels) >= 1
    assert service.metric("canaryflow_tokens_total", direction="in", **labels) > 0
    assert service.metric("canaryflow_tokens_total", direction="out", **labels) > 0
    assert service.metric("canaryflow_cost_usd_total", **labels) > 0
    text = service.admin.get("/metrics").text
    assert 'le="0.005"' in text and 'le="10.0"' in text


def test_records_are_written_with_pii_masked(service: ServiceUnderTest) -> None:
    since = datetime.now(UTC) - timedelta(seconds=1)
    r = service.chat(
        "Please mail jane.doe@example.com about my order",
        {"x-request-id": "req-pii", "x-canaryflow-user": "user-7"},
    )
    assert r.status_code == 200

    def stored() -> list[Any]:
        records = service.store.records(SERVICE, since, datetime.now(UTC) + timedelta(seconds=1))
        return [rec for rec in records if rec.request_id == "req-pii"]

    (record,) = wait_for("the record of req-pii in the store", stored, 5)
    assert "jane.doe@example.com" not in record.prompt
    assert "[EMAIL]" in record.prompt
    assert (record.version, record.role, record.user, record.status) == (
        "1",
        "stable",
        hash_user("user-7", service.store.user_salt),  # never the raw id
        200,
    )
    assert record.tokens_in > 0 and record.latency_ms > 0


def test_hallucinating_version_gets_quality_flags(service: ServiceUnderTest) -> None:
    since = datetime.now(UTC) - timedelta(seconds=1)
    questions = [
        "What is the capital of France?",
        "What is the capital of Germany?",
        "What is the capital of Japan?",
    ]
    for q in questions:
        assert service.chat(
            q, {"x-canaryflow-role": "canary", "x-canaryflow-version": "3"}
        ).is_success
    labels = {"service": SERVICE, "version": "3", "role": "canary"}
    wait_for(
        f"{len(questions)} hallucination flags on version 3",
        lambda: (
            service.metric("canaryflow_quality_flags_total", flag="hallucination", **labels)
            >= len(questions)
        ),
        5,
    )
    assert service.metric("canaryflow_quality_checked_total", **labels) >= len(questions)
    records = service.store.records(
        SERVICE, since, datetime.now(UTC) + timedelta(seconds=1), version="3"
    )
    assert records and all(r.checked and r.hallucination for r in records)
    # Flagged by the judge over HTTP (the sandbox's sandbox-judge), not by a marker.
    assert all("llm_judge/sandbox-judge/v1=judged" in r.checks for r in records)


def test_shadow_never_executes_tools_while_stable_does(service: ServiceUnderTest) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "create_ticket",
                "description": "Open a support ticket",
                "parameters": {"type": "object", "properties": {"title": {"type": "string"}}},
            },
        }
    ]
    prompt = "Please create a ticket: the login page is broken"
    before = len(_Handler.tool_calls)
    shadow = service.chat(
        prompt,
        {"host": "svc-shadow", "x-canaryflow-mirror": "1", "x-canaryflow-shadow-version": "1"},
        tools=tools,
    )
    assert shadow.status_code == 200, shadow.text
    assert shadow.json()["choices"][0]["message"]["tool_calls"]
    assert shadow.headers["x-canaryflow-tool-calls"] == "create_ticket:skipped"
    assert len(_Handler.tool_calls) == before
    stable = service.chat(prompt, {"x-canaryflow-role": "stable"}, tools=tools)
    assert stable.headers["x-canaryflow-tool-calls"] == "create_ticket:executed"
    assert len(_Handler.tool_calls) == before + 1
    assert service.metric("canaryflow_tool_calls_total", role="shadow", action="skipped") >= 1


def test_slow_shadow_gives_up_at_its_own_timeout(service: ServiceUnderTest) -> None:
    started = time.monotonic()
    r = service.chat(
        "What is the capital of France?",
        {"host": "x-shadow", "x-canaryflow-mirror": "1", "x-canaryflow-shadow-version": "6"},
    )
    assert r.status_code == 502
    assert time.monotonic() - started < 2.0  # shadow_timeout_s=0.5, the provider takes 3 s
    assert "did not answer" in r.json()["error"]["message"]


def test_registry_outage_after_warm_up_keeps_serving(service: ServiceUnderTest) -> None:
    headers = {"x-canaryflow-role": "canary", "x-canaryflow-version": "2"}
    assert service.chat("What is the capital of Italy?", headers).status_code == 200
    errors_before = service.metric("canaryflow_registry_errors_total")
    service.registry.down = True
    try:
        statuses: list[int] = []

        def refresh_failed() -> bool:
            # Each request past the ttl starts a background refresh; it fails while the
            # registry is down, and the request is answered from the last good manifest.
            statuses.append(service.chat("What is the capital of Italy?", headers).status_code)
            return service.metric("canaryflow_registry_errors_total") > errors_before

        wait_for("a failed registry refresh", refresh_failed, 5)
        # After the failed refresh, too: fail-static.
        statuses += [
            service.chat("What is the capital of Italy?", headers).status_code for _ in range(5)
        ]
        assert statuses == [200] * len(statuses)
    finally:
        service.registry.down = False


def test_unknown_version_is_503_with_a_clear_message(service: ServiceUnderTest) -> None:
    r = service.chat("hi", {"x-canaryflow-version": "99"})
    assert r.status_code == 503
    message = r.json()["error"]["message"]
    assert "'99'" in message and SERVICE in message and "registry" in message


def test_provider_429_passes_through(service: ServiceUnderTest) -> None:
    r = service.chat("What is the capital of France?", {"x-canaryflow-version": "4"})
    assert r.status_code == 429
    assert r.json()["error"]["type"] == "rate_limited"
    assert r.headers["retry-after"] == "2"
    assert service.metric("canaryflow_requests_total", version="4", status="429") >= 1


def test_bad_role_header_and_bad_body_are_400(service: ServiceUnderTest) -> None:
    assert service.chat("hi", {"x-canaryflow-role": "admin"}).status_code == 400
    r = service.client.post("/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400
    assert "not JSON" in r.json()["error"]["message"]


def test_full_record_queue_drops_and_counts_instead_of_waiting(sandbox: str) -> None:
    config = ServiceConfig(
        service=SERVICE,
        provider_urls={"sandbox": sandbox},
        default_version="1",
        check_sample=0.0,
        queue_size=1,
        flush_every_s=5.0,  # the worker sleeps on its first record: the queue stays full
    )
    with running(build_app(config, resolver=CachedResolver(Registry().fetch))) as urls:
        client = ServiceUnderTest(urls, Registry(), None)
        statuses = [client.chat("What is the capital of France?").status_code for _ in range(4)]
        assert statuses == [200] * 4
        assert client.metric("canaryflow_records_dropped_total") >= 2


def test_command_line_serves_a_manifest_file(sandbox: str, tmp_path: Path) -> None:
    manifest_file = tmp_path / "manifest.json"
    manifest_file.write_text(MANIFESTS["1"].model_dump_json())
    port, admin_port = free_port(), free_port()
    sock = tmp_path / "sockets" / "service.sock"
    process = ManagedProcess(
        "service",
        [
            sys.executable, "-m", "canaryflow.dataplane.serve", "--service", SERVICE,
            "--port", str(port), "--admin-port", str(admin_port), "--registry-uri", f"http://127.0.0.1:{free_port()}",
            "--manifest", f"1={manifest_file}", "--provider-url", f"sandbox={sandbox}",
            "--default-version", "1", "--store", str(tmp_path / "records.db"), "--uds", str(sock),
        ],
        tmp_path / "service.log",
        http_ok(f"http://127.0.0.1:{port}/health"),
    )  # fmt: skip
    process.start(timeout_s=30)
    try:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        body = {"messages": [{"role": "user", "content": "What is the capital of France?"}]}
        ok = httpx.post(url, json=body, timeout=10)
        assert ok.status_code == 200, ok.text
        assert ok.headers["x-canaryflow-version"] == "1"
        # A version that is neither local nor reachable in the (absent) registry.
        missing = httpx.post(url, json=body, headers={"x-canaryflow-version": "9"}, timeout=10)
        assert missing.status_code == 503
        assert "'9'" in missing.json()["error"]["message"]
        assert httpx.get(f"http://127.0.0.1:{port}/metrics").status_code == 404
        metrics = httpx.get(f"http://127.0.0.1:{admin_port}/metrics").text
        assert (
            'canaryflow_requests_total{role="stable",service="my-assistant",status="200"' in metrics
        )
        # The public routes on the Unix socket too (Envoy's way in), owner-only; not the admin.
        assert sock.stat().st_mode & 0o777 == 0o600
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), timeout=10) as local:
            over_socket = local.post("http://service/v1/chat/completions", json=body)
            assert over_socket.status_code == 200, over_socket.text
            assert local.get("http://service/metrics").status_code == 404
    finally:
        process.stop()
    assert not sock.exists(), "the socket file goes with the service"


def test_champion_alias_in_a_real_mlflow_registry_serves_direct_calls(
    mlflow_server: str, sandbox: str, tmp_path: Path
) -> None:
    from canaryflow.dataplane.resolver import default_resolver
    from canaryflow.registry.signing import generate_keypair, sign
    from canaryflow.registry.versions import MlflowRegistry

    key = generate_keypair(tmp_path, "release", [SERVICE])
    registry = MlflowRegistry(mlflow_server)
    published = registry.publish(sign(MANIFESTS["2"], key.private_path))
    registry.set_alias(SERVICE, "champion", published.version)
    config = ServiceConfig(
        service=SERVICE,
        provider_urls={"sandbox": sandbox},
        registry_uri=mlflow_server,
        check_sample=0.0,
    )
    # As `canaryflow serve --keys-dir` builds it: registry manifests verified before serving.
    resolver = default_resolver(mlflow_server, {}, config.registry_ttl_s, tmp_path)
    with running(build_app(config, resolver=resolver)) as urls:
        client = ServiceUnderTest(urls, Registry(), None)
        r = client.chat("What is the capital of France?")
        assert r.status_code == 200, r.text
        assert r.headers["x-canaryflow-version"] == published.version
        assert r.json()["model"].startswith("sandbox-good")
