"""Hostile input against a real model service: one 24,000-character prompt built from what used
to make PII masking backtrack must not slow down the other users, and must be stored masked.

A real sandbox provider and a real `canaryflow serve` process (its own event loop and GIL, a
SQLite store, checks on every request) are started; bystanders (closed loop, a few users) run
against it, first alone (baseline), then while the hostile prompt is answered, recorded and
masked. Before the fix, masking that prompt held the service's event loop for seconds.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from canaryflow.contracts import DecodingParameters, ModelManifest, Origin, Price, RequestRecord
from canaryflow.dataplane.pii import MAX_CHARS
from canaryflow.dataplane.store import Store
from canaryflow.local.processes import ManagedProcess, free_port, http_ok
from tests.waiting import wait_for

SERVICE = "pii-faults"
USERS = 4
BASELINE_S = 3.0
AFTER_S = 0.5  # bystanders keep going this long after the hostile record is stored
PII = "jane.doe@example.com 078-05-1120 4111 1111 1111 1111 AKIAIOSFODNN7EXAMPLE"


def hostile_prompt() -> str:
    """24,000 characters: runs that made the old patterns backtrack (parentheses: ~6 s of CPU
    alone; `sk-sk-...`; a long local part before an '@'), with real PII in between."""
    parts = ["(" * 16_000, f" {PII} ", "sk-" * 1_500, " ", "a" * 2_000 + "@", " 1" * 600]
    text = "".join(parts)
    return (text + " " + "x" * 24_000)[:24_000]


def manifest() -> ModelManifest:
    return ModelManifest(
        model_id=f"{SERVICE}/sandbox-docs-v1.0+ds-1",
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
        origin=Origin(provider="sandbox", model="sandbox-base@latency_ms=20,sigma=0,error_rate=0"),
        prompt_template="Answer briefly.\n\nQuestion: {input}",
        parameters=DecodingParameters(temperature=0.3, top_p=0.9, max_tokens=64, seed=11),
        tokenizer_version="t1",
        embedding_version="e1",
        license="apache-2.0",
        price=Price(input_per_1k=0.5, output_per_1k=1.5),
    )


@dataclass
class Service:
    url: str
    store_path: Path


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    home = tmp_path_factory.mktemp("pii-faults")
    sandbox_port, service_port, admin_port = free_port(), free_port(), free_port()
    sandbox_url = f"http://127.0.0.1:{sandbox_port}"
    sandbox = ManagedProcess(
        "sandbox",
        [sys.executable, "-m", "canaryflow.sandbox", "--host", "127.0.0.1",
         "--port", str(sandbox_port)],
        home / "sandbox.log",
        http_ok(f"{sandbox_url}/health"),
    ).start(timeout_s=30)  # fmt: skip
    manifest_path = home / "manifest.json"
    manifest_path.write_text(manifest().model_dump_json())
    store_path = home / "records.db"
    url = f"http://127.0.0.1:{service_port}"
    served = ManagedProcess(
        "model-service",
        [sys.executable, "-m", "canaryflow.dataplane.serve", "--service", SERVICE,
         "--port", str(service_port), "--admin-port", str(admin_port),
         "--manifest", f"1={manifest_path}",
         "--provider-url", f"sandbox={sandbox_url}", "--store", str(store_path),
         "--default-version", "1", "--check-sample", "1.0"],
        home / "service.log",
        http_ok(f"{url}/health"),
    )  # fmt: skip
    try:
        served.start(timeout_s=60)
        yield Service(url, store_path)
    finally:
        served.stop()
        sandbox.stop()


def body(text: str) -> dict[str, object]:
    return {"model": "canaryflow", "messages": [{"role": "user", "content": text}]}


@dataclass
class Bystanders:
    """USERS closed-loop users; each latency is kept with the time its request was sent."""

    url: str
    samples: list[tuple[float, float]] = field(default_factory=list)
    errors: int = 0
    running: bool = True

    async def user(self, client: httpx.AsyncClient, n: int) -> None:
        i = 0
        while self.running:
            i += 1
            sent = time.perf_counter()
            r = await client.post(
                "/v1/chat/completions",
                json=body(f"What is the capital of France? ({n}.{i})"),
                headers={"x-canaryflow-user": f"bystander-{n}"},
            )
            took = time.perf_counter() - sent
            if r.status_code == 200:
                self.samples.append((sent, took))
            else:
                self.errors += 1

    def between(self, start: float, end: float) -> list[float]:
        return [took for sent, took in self.samples if start <= sent < end]


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q * 100) - 1]


def stored(path: Path, request_id: str) -> RequestRecord | None:
    now = datetime.now(UTC)
    with Store(path) as store:
        found = [
            r
            for r in store.records(SERVICE, now - timedelta(hours=1), now + timedelta(minutes=1))
            if r.request_id == request_id
        ]
    return found[0] if found else None


def test_a_hostile_prompt_leaves_other_users_alone_and_is_stored_masked(
    service: Service,
) -> None:
    prompt = hostile_prompt()
    assert len(prompt) == 24_000

    async def scenario() -> tuple[Bystanders, float, float, int]:
        users = Bystanders(service.url)
        limits = httpx.Limits(max_connections=USERS + 2)
        async with httpx.AsyncClient(base_url=service.url, timeout=30, limits=limits) as client:
            tasks = [asyncio.create_task(users.user(client, n)) for n in range(USERS)]
            await asyncio.sleep(0.5)  # warm: connections open, first records written
            users.samples.clear()
            await asyncio.sleep(BASELINE_S)
            hostile_sent = time.perf_counter()
            r = await client.post(
                "/v1/chat/completions",
                json=body(prompt),
                headers={"x-request-id": "hostile", "x-canaryflow-user": "mallory"},
            )
            status = r.status_code
            while stored(service.store_path, "hostile") is None:
                if time.perf_counter() - hostile_sent > 30:
                    break
                await asyncio.sleep(0.05)
            written = time.perf_counter()
            await asyncio.sleep(AFTER_S)
            users.running = False
            await asyncio.gather(*tasks)
        return users, hostile_sent, written, status

    users, hostile_sent, written, status = asyncio.run(scenario())
    assert status == 200
    before = users.between(0, hostile_sent)
    # From the hostile request until its record was stored (answered, checked, masked, written).
    during = users.between(hostile_sent, written + 0.1)
    b50, b99 = statistics.median(before), quantile(before, 0.99)
    d50, d99 = statistics.median(during), quantile(during, 0.99)
    print(
        f"\nbystanders ({USERS} users, closed loop): baseline n={len(before)} "
        f"p50={b50 * 1000:.1f} ms p99={b99 * 1000:.1f} ms | with the hostile prompt "
        f"n={len(during)} p50={d50 * 1000:.1f} ms p99={d99 * 1000:.1f} ms "
        f"max={max(during) * 1000:.1f} ms | hostile record stored "
        f"{(written - hostile_sent) * 1000:.0f} ms after it was sent"
    )
    assert users.errors == 0
    assert len(before) >= 20 and len(during) >= 8
    # Bounded relative to the baseline (slack for a shared machine); masking the prompt in one
    # go held the loop for seconds, which every bystander in flight would have waited out.
    assert d50 <= 2 * b50 + 0.020, (b50, d50)
    assert d99 <= 3 * b99 + 0.100, (b99, d99)
    assert max(during) < 1.0

    record = stored(service.store_path, "hostile")
    assert record is not None
    for raw in [*PII.split(" "), "mallory"]:
        assert raw not in record.prompt and raw != record.user
    assert record.user is not None and record.user.startswith("u_")
    assert all(p in record.prompt for p in ("[EMAIL]", "[SSN]", "[CARD]", "[SECRET]"))
    assert len(record.prompt) <= MAX_CHARS


def test_a_prompt_over_the_cap_is_stored_cut_and_masked(service: Service) -> None:
    head = "Please keep this. " * 200
    tail = f" {PII} " * 3_000  # PII from well before to well after the cap
    prompt = head + tail
    assert len(prompt) > 2 * MAX_CHARS
    r = httpx.post(
        f"{service.url}/v1/chat/completions",
        json=body(prompt),
        headers={"x-request-id": "over-the-cap"},
        timeout=30,
    )
    # The service may refuse a body this large (a limit is not this test's business); whatever
    # it keeps of the request is masked and capped.
    assert r.status_code in (200, 413)
    record = wait_for("the over-the-cap record", lambda: stored(service.store_path, "over-the-cap"))
    assert len(record.prompt) <= MAX_CHARS
    for raw in PII.split(" "):
        assert raw not in record.prompt
    if r.status_code == 200:
        assert record.prompt.startswith(head)
        assert record.prompt.endswith(f"[TRUNCATED: {len(prompt)} characters in all]")
