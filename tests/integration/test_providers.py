"""ProviderClient against a real HTTP server that misbehaves on demand.

The server plays a script chosen by the request's model name, e.g. `s1:429r0.3,200` answers the
first call with 429 + `Retry-After: 0.3` and the second with a normal completion. Each test uses
its own script name, so the per-script call counters never mix.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from canaryflow.contracts import DecodingParameters, ModelManifest, Origin, Price
from canaryflow.errors import (
    BudgetExceeded,
    ConfigError,
    ProviderResponseError,
    TransientProviderError,
)
from canaryflow.local.processes import free_port
from canaryflow.providers.cache import ResponseCache
from canaryflow.providers.client import Budget, ProviderClient
from canaryflow.providers.config import from_urls, provider_config
from tests.waiting import wait_for


class ScriptedProvider:
    def __init__(self) -> None:
        self.calls: dict[str, int] = defaultdict(int)
        self.bodies: dict[str, list[dict[str, object]]] = defaultdict(list)

    async def chat(self, request: Request) -> Response:
        body = await request.json()
        name, _, script = str(body["model"]).partition(":")
        steps = script.split(",")
        step = steps[min(self.calls[name], len(steps) - 1)]
        self.calls[name] += 1
        self.bodies[name].append(body)
        if step.startswith("429"):
            headers = {"Retry-After": step[4:]} if step.startswith("429r") else {}
            return JSONResponse({"error": "slow down"}, status_code=429, headers=headers)
        if step.isdigit() and int(step) >= 400:
            return JSONResponse({"error": f"scripted {step}"}, status_code=int(step))
        if step == "garbage":
            return Response("<html>bad gateway page</html>", media_type="text/html")
        if step == "nochoices":
            return JSONResponse({"id": "x", "object": "chat.completion"})
        if step.startswith("sleep"):
            await asyncio.sleep(float(step[5:]))
        content = body["messages"][0]["content"]
        return JSONResponse(
            {
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": f"echo {content}"}}
                ],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
            }
        )


@pytest.fixture(scope="module")
def provider() -> Iterator[tuple[str, ScriptedProvider]]:
    scripted = ScriptedProvider()
    app = Starlette(routes=[Route("/v1/chat/completions", scripted.chat, methods=["POST"])])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for("the scripted provider to start", lambda: server.started or not thread.is_alive(), 10)
    assert server.started, "the scripted provider's server thread ended before it started"
    yield f"http://127.0.0.1:{port}", scripted
    server.should_exit = True
    thread.join(timeout=5)


def manifest(model: str, **parameters: object) -> ModelManifest:
    return ModelManifest(
        model_id="test-app/echo-v1.0+ds-1",
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
        origin=Origin(provider="scripted", model=model),
        prompt_template="Q: {input}",
        parameters=DecodingParameters.model_validate(parameters),
        tokenizer_version="tok-1",
        embedding_version="emb-1",
        license="apache-2.0",
        price=Price(input_per_1k=1.0, output_per_1k=2.0),
    )


async def test_completion_carries_text_usage_and_cost(
    provider: tuple[str, ScriptedProvider],
) -> None:
    url, scripted = provider
    async with ProviderClient(url) as client:
        result = await client.complete(manifest("ok:200", seed=7, stop=["\n"]), "hi")
    assert result.text == "echo Q: hi"
    assert (result.tokens_in, result.tokens_out, result.status) == (10, 5, 200)
    assert result.cost_usd == pytest.approx(10 / 1000 * 1.0 + 5 / 1000 * 2.0)
    assert not result.cached and result.latency_ms > 0
    sent = scripted.bodies["ok"][0]
    assert sent["model"] == "ok:200"
    assert sent["messages"] == [{"role": "user", "content": "Q: hi"}]
    assert (sent["seed"], sent["stop"], sent["max_tokens"]) == (7, ["\n"], 256)


async def test_retry_waits_as_long_as_retry_after_says(
    provider: tuple[str, ScriptedProvider],
) -> None:
    url, scripted = provider
    async with ProviderClient(url, backoff_s=0.001) as client:
        started = time.perf_counter()
        result = await client.complete(manifest("ra:429r0.4,200"), "x")
        elapsed = time.perf_counter() - started
    assert result.status == 200
    assert scripted.calls["ra"] == 2
    assert elapsed >= 0.4  # waited as long as Retry-After said (backoff alone is ~1 ms)


async def test_429_then_success_returns_the_answer(provider: tuple[str, ScriptedProvider]) -> None:
    url, scripted = provider
    async with ProviderClient(url, backoff_s=0.01) as client:
        result = await client.complete(manifest("r429:429,429,200"), "x")
    assert result.text == "echo Q: x"
    assert scripted.calls["r429"] == 3


async def test_persistent_5xx_becomes_transient_error_after_retries(
    provider: tuple[str, ScriptedProvider],
) -> None:
    url, scripted = provider
    async with ProviderClient(url, max_retries=3, backoff_s=0.01) as client:
        with pytest.raises(TransientProviderError, match=r"after 4 attempts; last: HTTP 503"):
            await client.complete(manifest("down:503"), "x")
    assert scripted.calls["down"] == 4


async def test_timeout_is_retried_then_transient(provider: tuple[str, ScriptedProvider]) -> None:
    url, scripted = provider
    async with ProviderClient(url, timeout_s=0.1, max_retries=1, backoff_s=0.01) as client:
        with pytest.raises(TransientProviderError, match="timed out"):
            await client.complete(manifest("hang:sleep1"), "x")
    assert scripted.calls["hang"] == 2


async def test_connection_refused_is_transient() -> None:
    async with ProviderClient(
        f"http://127.0.0.1:{free_port()}", max_retries=1, backoff_s=0.01
    ) as c:
        with pytest.raises(TransientProviderError, match="connection failed"):
            await c.complete(manifest("any:200"), "x")


@pytest.mark.parametrize(
    ("script", "match"),
    [
        ("garbage", r"HTTP 200 but the body is not JSON: '<html>bad gateway"),
        ("nochoices", r"no choices\[0\]\.message\.content or usage"),
        ("400", r"HTTP 400: .*scripted 400.*a retry will not help"),
    ],
)
async def test_unusable_answer_is_a_response_error_without_retry(
    provider: tuple[str, ScriptedProvider], script: str, match: str
) -> None:
    url, scripted = provider
    name = f"bad-{script}"
    async with ProviderClient(url, backoff_s=0.01) as client:
        with pytest.raises(ProviderResponseError, match=match):
            await client.complete(manifest(f"{name}:{script}"), "x")
    assert scripted.calls[name] == 1


async def test_token_budget_stops_before_overspending(
    provider: tuple[str, ScriptedProvider],
) -> None:
    url, scripted = provider
    budget = Budget(max_tokens=100)
    async with ProviderClient(url, budget=budget) as client:
        answers = 0
        with pytest.raises(
            BudgetExceeded, match=r"token budget of 100 .*Raise the budget or sample"
        ):
            for _ in range(20):
                await client.complete(manifest("budget:200", max_tokens=20), "x")
                answers += 1
    # Each call reserves 21 (1 prompt-token estimate + max_tokens 20) and spends 15: after six
    # answers 90 are spent and the seventh reservation (111) is refused before it is sent.
    assert budget.spent_tokens == 90
    assert answers == scripted.calls["budget"] == 6


async def test_cost_budget_names_the_cost(provider: tuple[str, ScriptedProvider]) -> None:
    url, _ = provider
    async with ProviderClient(url, budget=Budget(max_cost_usd=0.001)) as client:
        with pytest.raises(BudgetExceeded, match=r"cost budget of \$0\.0010"):
            await client.complete(manifest("cost:200"), "x")


async def test_second_identical_call_is_served_from_cache(
    provider: tuple[str, ScriptedProvider], tmp_path: Path
) -> None:
    url, scripted = provider
    cache = ResponseCache(tmp_path / "cache.sqlite")
    m = manifest("cached:200")
    async with ProviderClient(url, cache=cache) as client:
        first = await client.complete(m, "same")
        second = await client.complete(m, "same")
        other = await client.complete(m, "different")
    assert not first.cached and second.cached and not other.cached
    assert second.text == first.text and second.tokens_out == first.tokens_out
    assert second.cost_usd == 0.0
    assert scripted.calls["cached"] == 2
    cache.close()
    # A new process reading the same file replays without calling the provider.
    reopened = ResponseCache(tmp_path / "cache.sqlite")
    async with ProviderClient(url, cache=reopened) as client:
        again = await client.complete(m, "same")
    assert again.cached and again.text == first.text
    assert scripted.calls["cached"] == 2
    assert len(reopened) == 2


async def test_different_parameters_miss_the_cache(provider: tuple[str, ScriptedProvider]) -> None:
    url, scripted = provider
    cache = ResponseCache(None)
    async with ProviderClient(url, cache=cache) as client:
        await client.complete(manifest("params:200", temperature=0.0), "x")
        second = await client.complete(manifest("params:200", temperature=0.7), "x")
    assert not second.cached
    assert scripted.calls["params"] == 2


async def test_concurrency_is_bounded(provider: tuple[str, ScriptedProvider]) -> None:
    url, _ = provider
    m = manifest("conc:sleep0.2")
    async with ProviderClient(url, concurrency=2) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client.complete(m, str(i)) for i in range(4)))
        elapsed = time.perf_counter() - started
    assert elapsed >= 0.4  # 4 calls of 0.2 s, two at a time


def test_provider_config_names_missing_provider() -> None:
    bare = from_urls({"sandbox": "http://h:1"})
    assert provider_config(bare, "sandbox").base_url == "http://h:1/v1"
    with pytest.raises(ConfigError) as caught:
        provider_config(bare, "gemini", source="the stack's provider_urls")
    assert "provider 'gemini' is not configured in the stack's provider_urls" in str(caught.value)
    assert "(configured: sandbox)" in str(caught.value)
    assert "CANARYFLOW_PROVIDER_URLS" not in str(caught.value)


def test_cache_key_is_stable_and_sensitive() -> None:
    messages = [{"role": "user", "content": "x"}]
    key = ResponseCache.key("d1", messages, {"temperature": 0.0, "top_p": 1.0})
    assert key == ResponseCache.key("d1", messages, {"top_p": 1.0, "temperature": 0.0})
    assert key != ResponseCache.key("d2", messages, {"temperature": 0.0, "top_p": 1.0})
    assert json.loads(json.dumps(key)) == key and len(key) == 64
