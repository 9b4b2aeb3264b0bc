"""Streamed chat through the model service over real HTTP: the sandbox streaming as OpenAI does,
a real uvicorn server running the service, and a tiny streaming provider of the test's own that
notices when its caller hangs up.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from canaryflow.contracts import Role
from canaryflow.dataplane.resolver import CachedResolver
from canaryflow.dataplane.service import ServiceConfig, build_app
from canaryflow.dataplane.store import Store
from canaryflow.local.processes import free_port, http_ok
from tests.integration.test_service import (  # noqa: F401  (sandbox: a fixture)
    SERVICE,
    Registry,
    manifest,
    running,
    sandbox,
)
from tests.waiting import wait_for

PACED = "sandbox-base@latency_ms=800,sigma=0,error_rate=0,verbosity=6"
MANIFESTS = {
    "paced": manifest(PACED),
    "fast": manifest("sandbox-base@latency_ms=0,sigma=0,error_rate=0"),
    "cut": manifest("sandbox-base@latency_ms=200,sigma=0,error_rate=0,truncated_stream=1"),
    "limited": manifest("sandbox-base@latency_ms=0,sigma=0,error_rate=0,rate_429=1,retry_after=3"),
    "slow-events": manifest("slow-events", provider="trickle"),
    "html": manifest("html", provider="trickle"),
}
QUESTION = "What is the capital of France?"


class TrickleProvider:
    """Streams 200 events 20 ms apart (`slow-events`), or an HTML page with a 200 (`html`);
    records how many events it sent before its client went away."""

    def __init__(self) -> None:
        self.sent: list[int] = []
        self.hung_up = threading.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/health":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        model = json.loads(body)["model"]
        if model == "html":
            page = b"<html><body><h1>502 Bad Gateway</h1>\n<p>nginx</p></body></html>\n"
            headers = [(b"content-type", b"text/html")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": page})
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        sent = 0
        disconnected = asyncio.ensure_future(receive())
        for _ in range(200):
            chunk = {"choices": [{"index": 0, "delta": {"content": "word "}}]}
            data = b"data: " + json.dumps(chunk).encode() + b"\n\n"
            await send({"type": "http.response.body", "body": data, "more_body": True})
            sent += 1
            await asyncio.sleep(0.02)
            if disconnected.done():
                break
        self.sent.append(sent)
        if disconnected.done():
            self.hung_up.set()
            return
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


@pytest.fixture(scope="module")
def trickle() -> Iterator[tuple[str, TrickleProvider]]:
    provider = TrickleProvider()
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(provider, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for("the trickle provider", http_ok(f"http://127.0.0.1:{port}/health"), 15)
    yield f"http://127.0.0.1:{port}", provider
    server.should_exit = True
    thread.join(timeout=10)


class Streaming:
    def __init__(self, url: str, store: Store, provider: TrickleProvider) -> None:
        self.url, self.store, self.provider = url, store, provider
        self.client = httpx.Client(base_url=url, timeout=15)

    def body(self, version: str, text: str = QUESTION, **extra: Any) -> dict[str, Any]:
        return {
            "model": "canaryflow",
            "messages": [{"role": "user", "content": text}],
            "stream": True,
            **extra,
        }

    def headers(self, version: str, request_id: str) -> dict[str, str]:
        return {"x-canaryflow-version": version, "x-request-id": request_id}

    def events(self, version: str, request_id: str, **extra: Any) -> list[tuple[float, bytes]]:
        """Each SSE event with the time it reached the client (s after the request left)."""
        sent = time.perf_counter()
        out: list[tuple[float, bytes]] = []
        with self.client.stream(
            "POST",
            "/v1/chat/completions",
            json=self.body(version, **extra),
            headers=self.headers(version, request_id),
        ) as response:
            assert response.status_code == 200, response.read()
            assert response.headers["content-type"].startswith("text/event-stream")
            buffer = b""
            for data in response.iter_raw():
                buffer += data
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    out.append((time.perf_counter() - sent, event))
        return out

    def record(self, request_id: str, role: Role = Role.STABLE) -> Any:
        def stored() -> Any:
            rows = [
                r
                for r in self.store.records(SERVICE, *EVER)
                if r.request_id == request_id and r.role is role
            ]
            return rows[0] if rows else None

        return wait_for(f"record {request_id}", stored, 10)


EVER = (datetime(2020, 1, 1, tzinfo=UTC), datetime(2100, 1, 1, tzinfo=UTC))


def _chunks(events: list[tuple[float, bytes]]) -> list[dict[str, Any]]:
    return [json.loads(e[6:]) for _, e in events if e.startswith(b"data: {")]


def _text(events: list[tuple[float, bytes]]) -> str:
    return "".join(
        c["choices"][0]["delta"].get("content") or "" for c in _chunks(events) if c.get("choices")
    )


@pytest.fixture(scope="module")
def streaming(
    sandbox: str,  # noqa: F811
    trickle: tuple[str, TrickleProvider],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Streaming]:
    store = Store(str(tmp_path_factory.mktemp("store") / "records.db"))
    registry = Registry()
    registry_fetch = registry.fetch

    def fetch(service: str, version: str) -> Any:
        return MANIFESTS[version] if version in MANIFESTS else registry_fetch(service, version)

    trickle_url, provider = trickle
    config = ServiceConfig(
        service=SERVICE,
        provider_urls={"sandbox": sandbox, "trickle": trickle_url},
        default_version="fast",
        check_sample=1.0,
        timeout_s=5.0,
        flush_every_s=0.05,
        tool_urls={},
    )
    resolver = CachedResolver(fetch, ttl_s=30, retry_s=0.05)
    with running(build_app(config, resolver=resolver, store=store)) as (url, _admin):
        yield Streaming(url, store, provider)
    store.close()


# --------------------------------------------------------------------------- tests


def test_a_stream_reaches_the_client_event_by_event(streaming: Streaming) -> None:
    events = streaming.events("paced", "paced-1")
    assert events[-1][1] == b"data: [DONE]"
    content = [at for at, e in events if b'"content":"' in e and b'"content":""' not in e]
    assert len(content) >= 5
    # The sandbox waits 30% of 800 ms, then spreads the rest: the first words reach the client
    # long before the provider sends its last.
    assert content[0] < 0.45, content
    assert events[-1][0] - content[0] > 0.4, (content[0], events[-1][0])
    unary = streaming.client.post(
        "/v1/chat/completions",
        json={"model": "x", "messages": [{"role": "user", "content": QUESTION}]},
        headers=streaming.headers("paced", "paced-unary"),
    ).json()
    assert _text(events) == unary["choices"][0]["message"]["content"]  # seed 11: same answer


def test_the_record_holds_ttft_the_assembled_text_and_usage(streaming: Streaming) -> None:
    events = streaming.events("paced", "paced-2")
    record = streaming.record("paced-2")
    assert record.status == 200
    assert record.streamed is True
    assert record.response == _text(events)
    assert 200 <= record.ttft_ms <= 450, record.ttft_ms  # 30% of 800 ms, plus the path
    assert record.latency_ms >= 780
    assert record.inter_token_ms is not None and 10 <= record.inter_token_ms <= 200
    assert record.tokens_out > 0 and record.tokens_in > 0
    assert record.cost_usd > 0
    # The service asked for usage; the client did not, so it never saw the usage chunk.
    assert not any("usage" in c and not c.get("choices") for c in _chunks(events))


def test_usage_reaches_a_client_that_asks_for_it(streaming: Streaming) -> None:
    events = streaming.events("fast", "usage-1", stream_options={"include_usage": True})
    usage = [c["usage"] for c in _chunks(events) if c.get("usage")]
    record = streaming.record("usage-1")
    assert usage and usage[-1]["completion_tokens"] == record.tokens_out


def test_an_unstreamed_answer_records_its_latency_as_ttft(streaming: Streaming) -> None:
    r = streaming.client.post(
        "/v1/chat/completions",
        json={"model": "x", "messages": [{"role": "user", "content": QUESTION}]},
        headers=streaming.headers("fast", "unary-1"),
    )
    assert r.status_code == 200
    record = streaming.record("unary-1")
    assert record.streamed is False and record.ttft_ms == record.latency_ms


def test_tool_calls_and_json_answers_stream_too(streaming: Streaming) -> None:
    tools = [{"type": "function", "function": {"name": "create_ticket", "parameters": {}}}]
    events = streaming.events(
        "fast", "tools-1", text="Please create_ticket for my broken laptop", tools=tools
    )
    calls = [
        call
        for c in _chunks(events)
        for call in (c.get("choices") or [{}])[0].get("delta", {}).get("tool_calls") or ()
    ]
    assert calls and calls[0]["function"]["name"] == "create_ticket"
    record = streaming.record("tools-1")
    assert json.loads(record.response)[0]["function"]["name"] == "create_ticket"

    ask = "Give me a JSON object with keys city and country for Paris"
    json_mode = {"response_format": {"type": "json_object"}}
    events = streaming.events("fast", "json-1", text=ask, **json_mode)
    unary = streaming.client.post(
        "/v1/chat/completions",
        json={"model": "x", "messages": [{"role": "user", "content": ask}], **json_mode},
        headers=streaming.headers("fast", "json-unary"),
    ).json()
    assert _text(events).startswith('{"city": ')
    assert _text(events) == unary["choices"][0]["message"]["content"]


def test_a_client_that_hangs_up_cancels_the_provider_call(streaming: Streaming) -> None:
    before = len(streaming.provider.sent)
    with streaming.client.stream(
        "POST",
        "/v1/chat/completions",
        json=streaming.body("slow-events"),
        headers=streaming.headers("slow-events", "hangup-1"),
    ) as response:
        assert response.status_code == 200
        next(response.iter_raw())  # the first event, then the client leaves
    assert streaming.provider.hung_up.wait(5), "the provider kept generating for nobody"
    assert len(streaming.provider.sent) == before + 1
    assert streaming.provider.sent[-1] < 100  # of 200 events, 20 ms apart
    record = streaming.record("hangup-1")
    assert record.status == 499 and record.streamed


def test_a_truncated_stream_ends_with_an_error_event_and_counts_as_an_error(
    streaming: Streaming,
) -> None:
    events = streaming.events("cut", "cut-1")
    assert events[-1][1] != b"data: [DONE]"
    error = json.loads(events[-1][1][6:])["error"]
    assert error["code"] == 502 and "mid-answer" in error["message"], error
    record = streaming.record("cut-1")
    assert record.status == 502 and record.streamed
    assert record.response  # the half that arrived is kept as evidence


def test_a_provider_answering_html_is_a_counted_502(streaming: Streaming) -> None:
    events = streaming.events("html", "html-1")
    error = json.loads(events[-1][1][6:])["error"]
    assert error["code"] == 502 and "before it finished" in error["message"], error
    assert streaming.record("html-1").status == 502


def test_a_provider_refusal_before_the_stream_is_a_plain_json_error(streaming: Streaming) -> None:
    r = streaming.client.post(
        "/v1/chat/completions",
        json=streaming.body("limited"),
        headers=streaming.headers("limited", "limited-1"),
    )
    assert r.status_code == 429
    assert r.headers["retry-after"] == "3"
    assert r.json()["error"]["type"] == "rate_limited"
    assert streaming.record("limited-1").status == 429


def test_a_malformed_stream_flag_is_refused(streaming: Streaming) -> None:
    r = streaming.client.post(
        "/v1/chat/completions",
        json={**streaming.body("fast"), "stream": "yes"},
        headers=streaming.headers("fast", "bad-1"),
    )
    assert r.status_code == 400 and "'stream' must be true or false" in r.text


def test_hang_ups_lose_or_slow_no_other_request(streaming: Streaming) -> None:
    """Twenty clients leave mid-stream while twenty others ask: every other one is answered,
    and as fast as without the hang-ups."""

    def unary_ms(n: int) -> list[float]:
        times = []
        for i in range(n):
            r = streaming.client.post(
                "/v1/chat/completions",
                json={"model": "x", "messages": [{"role": "user", "content": QUESTION}]},
                headers=streaming.headers("fast", f"calm-{n}-{i}"),
            )
            assert r.status_code == 200, r.text
            times.append(r.elapsed.total_seconds() * 1000)
        return times

    quiet = unary_ms(20)

    def hang_up(i: int) -> None:
        with (
            httpx.Client(base_url=streaming.url, timeout=10) as client,
            client.stream(
                "POST",
                "/v1/chat/completions",
                json=streaming.body("slow-events"),
                headers=streaming.headers("slow-events", f"leaver-{i}"),
            ) as response,
        ):
            next(response.iter_raw())

    leavers = [threading.Thread(target=hang_up, args=(i,)) for i in range(20)]
    for thread in leavers:
        thread.start()
    busy = unary_ms(20)
    for thread in leavers:
        thread.join(10)
    assert sorted(busy)[len(busy) // 2] < sorted(quiet)[len(quiet) // 2] + 50, (quiet, busy)
    for i in range(20):
        assert streaming.record(f"leaver-{i}").status == 499
