"""A providers-file entry's limits hold in the model service: its timeout shortens the service's,
its concurrency and rate limits refuse at once (503 / 429 with Retry-After) instead of queueing.
A real sandbox and a real uvicorn server; the requests run concurrently over real sockets."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from canaryflow.contracts import ProvidersFile
from canaryflow.dataplane.resolver import CachedResolver
from canaryflow.dataplane.service import ServiceConfig, build_app
from tests.integration.test_service import SERVICE, manifest, running, sandbox  # noqa: F401

SLOW = "sandbox-base@latency_ms=600,sigma=0,error_rate=0"
MANIFESTS = {
    "one-at-a-time": manifest(SLOW, provider="narrow"),
    "two-per-second": manifest("sandbox-base@latency_ms=0,sigma=0,error_rate=0", provider="paced"),
    "impatient": manifest(SLOW, provider="impatient"),
}


@pytest.fixture(scope="module")
def service_url(sandbox: str) -> Iterator[str]:  # noqa: F811
    entries: dict[str, Any] = {
        "narrow": {"base_url": f"{sandbox}/v1", "auth": "none", "concurrency": 1},
        "paced": {"base_url": f"{sandbox}/v1", "auth": "none", "requests_per_s": 2},
        "impatient": {"base_url": f"{sandbox}/v1", "auth": "none", "timeout_s": 0.2},
    }
    config = ServiceConfig(
        service=SERVICE,
        provider_urls={},
        providers=ProvidersFile.model_validate({"providers": entries}),
        default_version="two-per-second",
        timeout_s=5.0,
    )
    resolver = CachedResolver(lambda service, version: MANIFESTS[version], ttl_s=30)
    with running(build_app(config, resolver=resolver)) as (url, _admin):
        yield url


async def _chats(url: str, version: str, n: int) -> list[httpx.Response]:
    body = {"model": "x", "messages": [{"role": "user", "content": "What is 2 + 2?"}]}
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        return await asyncio.gather(
            *(
                client.post(
                    "/v1/chat/completions", json=body, headers={"x-canaryflow-version": version}
                )
                for _ in range(n)
            )
        )


def test_over_the_concurrency_limit_is_refused_at_once(service_url: str) -> None:
    answers = asyncio.run(_chats(service_url, "one-at-a-time", 3))
    statuses = sorted(r.status_code for r in answers)
    assert statuses == [200, 503, 503], statuses
    refused = next(r for r in answers if r.status_code == 503)
    assert "concurrency limit" in refused.json()["error"]["message"]
    assert refused.elapsed.total_seconds() < 0.3  # not queued behind the 600 ms call


def test_over_the_rate_limit_is_a_429_with_retry_after(service_url: str) -> None:
    answers = asyncio.run(_chats(service_url, "two-per-second", 6))
    limited = [r for r in answers if r.status_code == 429]
    assert 3 <= len(limited) <= 4, [r.status_code for r in answers]  # a 2-request burst passes
    assert float(limited[0].headers["retry-after"]) > 0
    assert "requests_per_s" in limited[0].json()["error"]["message"]


def test_the_entry_timeout_shortens_the_service_timeout(service_url: str) -> None:
    (answer,) = asyncio.run(_chats(service_url, "impatient", 1))
    assert answer.status_code == 502
    assert "did not answer in 0.2 s" in answer.json()["error"]["message"]
