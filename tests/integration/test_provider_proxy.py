"""The evaluation client behind an HTTPS proxy, against a real one: a small CONNECT proxy.

The provider is the sandbox over HTTPS (a CA made for this module) under a name only the proxy
knows, `provider.test`: a call can reach it through a tunnel and no other way. With
`HTTPS_PROXY` set, the provider client, the preflight and the offline evaluation all go through
the proxy. `NO_PROXY` naming the host sends the client there directly (and, the name being
unresolvable here, it fails without a tunnel). A provider on this machine (127.0.0.1, localhost)
is never sent to a proxy, which could not reach it: the stack's sandbox keeps working when a user
exports a corporate proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from canaryflow import runbook
from canaryflow.contracts import (
    Endpoints,
    GatePolicy,
    ModelManifest,
    Origin,
    ProviderConfig,
    ProvidersFile,
)
from canaryflow.errors import TransientProviderError
from canaryflow.evaluation.harness import ERROR_PREFIX
from canaryflow.local import examples
from canaryflow.local.processes import free_port
from canaryflow.providers.client import ProviderClient
from canaryflow.providers.preflight import check_provider
from tests.certificates import SecuredSandbox, secured_sandbox
from tests.waiting import wait_for

HOST = "provider.test"  # resolved by the proxy only
KEY_VAR = "CANARYFLOW_TEST_PROXIED_KEY"
KEY = f"sk-proxied-{secrets.token_hex(16)}"
FAST = "sandbox-base@latency_ms=0,error_rate=0"
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy")


@dataclass
class ConnectProxy:
    """CONNECT host:port -> a TCP tunnel (host looked up in `hosts`, else used as is); any other
    request (a plain-http proxy request) is answered 502. Counts what it was asked."""

    hosts: dict[str, str]
    port: int = field(default_factory=free_port)
    tunnels: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
        if method != "CONNECT":
            self.refused.append(f"{method} {target}")
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            writer.close()
            return
        self.tunnels.append(target)
        host, port = target.rsplit(":", 1)
        upstream_reader, upstream_writer = await asyncio.open_connection(
            self.hosts.get(host, host), int(port)
        )
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while chunk := await source.read(65536):
                    sink.write(chunk)
                    await sink.drain()
            with contextlib.suppress(ConnectionError, OSError):
                sink.close()

        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    @contextlib.contextmanager
    def running(self) -> Iterator[ConnectProxy]:
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        server: asyncio.Server | None = None

        async def serve() -> None:
            nonlocal server
            server = await asyncio.start_server(self.handle, "127.0.0.1", self.port)
            ready.set()

        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        asyncio.run_coroutine_threadsafe(serve(), loop).result(timeout=5)
        wait_for("the proxy", ready.is_set)
        try:
            yield self
        finally:
            assert server is not None
            loop.call_soon_threadsafe(server.close)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=5)


@pytest.fixture(scope="module")
def provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecuredSandbox]:
    folder = tmp_path_factory.mktemp("proxied-provider")
    with secured_sandbox(folder, "CANARYFLOW_TEST_EXPECTED_KEY", KEY, hosts=[HOST]) as sandbox:
        yield sandbox


@pytest.fixture
def proxy(provider: SecuredSandbox, monkeypatch: pytest.MonkeyPatch) -> Iterator[ConnectProxy]:
    """The proxy, named by HTTPS_PROXY and HTTP_PROXY; NO_PROXY unset."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(KEY_VAR, KEY)
    with ConnectProxy(hosts={HOST: "127.0.0.1"}).running() as running:
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{running.port}")
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{running.port}")
        yield running


def config(provider: SecuredSandbox, host: str) -> ProviderConfig:
    port = provider.url.rsplit(":", 1)[1]
    return ProviderConfig(
        base_url=f"https://{host}:{port}/v1",
        api_key_env=KEY_VAR,
        ca_bundle=str(provider.certs.ca),
        timeout_s=5.0,
    )


def manifest() -> ModelManifest:
    base = examples.manifest("1.0", FAST)
    return base.model_copy(update={"origin": Origin(provider="proxied", model=FAST)})


async def ask(settings: ProviderConfig) -> str:
    async with ProviderClient.for_provider("proxied", settings, max_retries=0) as client:
        return (await client.complete(manifest(), "What is 17 + 25?")).text


def test_the_client_preflight_and_offline_evaluation_tunnel_through_https_proxy(
    provider: SecuredSandbox, proxy: ConnectProxy, tmp_path: Path
) -> None:
    settings = config(provider, HOST)
    assert "42" in asyncio.run(ask(settings))
    assert proxy.tunnels, "the call went through the proxy"
    providers = ProvidersFile(providers={"proxied": settings})
    check = check_provider(manifest(), providers)
    assert "accepted the key" in check.evidence[-1]
    endpoints = Endpoints(home=str(tmp_path), mlflow_uri="http://127.0.0.1:9", keys_dir="k")
    before = len(proxy.tunnels)
    report = runbook.evaluate_manifests(
        manifest(),
        manifest(),
        ["golden"],
        GatePolicy().offline,
        endpoints,
        sample_per_suite=3,
        providers=providers,
    )
    assert len(report.items) == 3
    assert not [i for i in report.items if i.candidate_output.startswith(ERROR_PREFIX)]
    assert len(proxy.tunnels) > before, "the offline evaluation went through the proxy"
    port = provider.url.rsplit(":", 1)[1]
    assert set(proxy.tunnels) == {f"{HOST}:{port}"} and not proxy.refused


def test_no_proxy_sends_the_host_direct(
    provider: SecuredSandbox, proxy: ConnectProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NO_PROXY", f"example.org,{HOST}")
    with pytest.raises(TransientProviderError, match="connection failed"):
        asyncio.run(ask(config(provider, HOST)))  # direct: nobody here resolves the name
    assert proxy.tunnels == [] and proxy.refused == []


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_a_provider_on_this_machine_never_goes_to_the_proxy(
    provider: SecuredSandbox, proxy: ConnectProxy, host: str
) -> None:
    """HTTPS_PROXY and HTTP_PROXY set, NO_PROXY not: a loopback provider is called directly,
    as the stack's own sandbox is."""
    assert "42" in asyncio.run(ask(config(provider, host)))
    assert proxy.tunnels == [] and proxy.refused == []
