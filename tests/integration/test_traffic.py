"""The traffic generator against a tiny real aiohttp server that records each arrival."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from canaryflow.errors import ConfigError
from canaryflow.local.loadgen import (
    STOP_GRACE_S,
    Prompt,
    TrafficRunner,
    TrafficStats,
    load_corpus,
    run_traffic,
)
from canaryflow.local.processes import free_port
from tests.waiting import wait_for

PROMPTS = [
    Prompt(id="p1", input="What is the capital of France?"),
    Prompt(id="p2", input="Summarise the release notes in one line."),
    Prompt(id="p3", input="Is 17 a prime number?"),
]
RUN_HEADER = "x-test-run"


@dataclass
class Arrival:
    at: float
    path: str
    run: str
    user: str
    body: dict[str, object]


@dataclass
class RecordingServer:
    url: str
    arrivals: list[Arrival] = field(default_factory=list)

    def of(self, run: str) -> list[Arrival]:
        return [a for a in list(self.arrivals) if a.run == run]


def _app(server: RecordingServer) -> web.Application:
    counter = iter(range(10**9))

    async def handle(request: web.Request) -> web.Response:
        n = next(counter)
        server.arrivals.append(
            Arrival(
                at=time.monotonic(),
                path=request.path,
                run=request.headers.get(RUN_HEADER, ""),
                user=request.headers.get("x-canaryflow-user", ""),
                body=await request.json(),
            )
        )
        kind = request.match_info.get("kind", "")
        if kind == "slow":
            await asyncio.sleep(float(request.headers.get("x-test-sleep", "5")))
        if kind == "flaky" and n % 2 == 0:
            return web.json_response({"error": "overloaded"}, status=503)
        role, version = ("canary", "2") if n % 10 == 0 else ("stable", "1")
        return web.json_response(
            {"choices": [{"message": {"role": "assistant", "content": "ok"}}]},
            headers={"x-canaryflow-role": role, "x-canaryflow-version": version},
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handle)
    app.router.add_post("/{kind}/v1/chat/completions", handle)
    return app


@pytest.fixture(scope="module")
def server() -> Iterator[RecordingServer]:
    """The server runs on its own event loop in a thread; stopped at the end of the module."""
    port = free_port()
    recording = RecordingServer(url=f"http://127.0.0.1:{port}")
    loop = asyncio.new_event_loop()
    # Handlers of requests the client gave up on are cancelled, so cleanup never waits for them.
    runner = web.AppRunner(_app(recording), access_log=None, handler_cancellation=True)
    started = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port, shutdown_timeout=1).start())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield recording
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def _run_id() -> str:
    return uuid.uuid4().hex


async def test_open_loop_holds_200_requests_per_second(server: RecordingServer) -> None:
    run = _run_id()
    report = await run_traffic(
        server.url, PROMPTS, rate_rps=200, duration_s=2.0, headers={RUN_HEADER: run}
    )
    arrivals = server.of(run)
    span = arrivals[-1].at - arrivals[0].at
    arrival_rate = (len(arrivals) - 1) / span
    assert len(arrivals) == pytest.approx(400, rel=0.10)
    assert arrival_rate == pytest.approx(200, rel=0.10), f"{arrival_rate:.1f} req/s at the server"
    assert report.achieved_rps == pytest.approx(200, rel=0.10)
    assert report.sent == report.ok == len(arrivals)
    assert report.errors == {}
    p50, p95, p99 = report.latency_p50_ms, report.latency_p95_ms, report.latency_p99_ms
    assert p50 is not None and p95 is not None and p99 is not None
    assert 0 < p50 <= p95 <= p99


async def test_each_request_is_a_chat_completion_from_a_user(server: RecordingServer) -> None:
    run = _run_id()
    await run_traffic(
        server.url, PROMPTS, rate_rps=100, duration_s=0.5, users=5, headers={RUN_HEADER: run}
    )
    arrivals = server.of(run)
    assert len(arrivals) >= 40
    assert all(re.fullmatch(r"user-[0-4]", a.user) for a in arrivals)
    assert len({a.user for a in arrivals}) > 1
    assert all(a.body["model"] == "canaryflow" for a in arrivals)
    contents = {a.body["messages"][0]["content"] for a in arrivals}  # type: ignore[index]
    assert contents <= {p.input for p in PROMPTS}
    assert all(a.path == "/v1/chat/completions" for a in arrivals)


async def test_the_same_seed_sends_the_same_users_and_prompts(server: RecordingServer) -> None:
    sequences = []
    for _ in range(2):
        run = _run_id()
        await run_traffic(
            server.url, PROMPTS, rate_rps=200, duration_s=0.1, seed=7, headers={RUN_HEADER: run}
        )
        sequences.append(
            sorted(
                (a.user, str(a.body["messages"])) for a in server.of(run)
            )  # arrival order varies
        )
    assert sequences[0] == sequences[1]


async def test_slow_responses_do_not_slow_the_schedule(server: RecordingServer) -> None:
    run = _run_id()
    delay_s = 0.5
    report = await run_traffic(
        f"{server.url}/slow",
        PROMPTS,
        rate_rps=50,
        duration_s=1.0,
        headers={RUN_HEADER: run, "x-test-sleep": str(delay_s)},
    )
    arrivals = server.of(run)
    assert report.ok == report.sent == len(arrivals) > 1
    # A loop that waited for each answer would send nothing while the first request is open; on
    # the schedule (one every 20 ms) about 25 of the 50 arrive before its 0.5 s answer.
    while_first_open = [a for a in arrivals[1:] if a.at < arrivals[0].at + delay_s]
    assert len(while_first_open) >= 10, f"{len(while_first_open)} sent while the first was open"
    assert report.latency_p50_ms is not None and report.latency_p50_ms >= 1000 * delay_s


async def test_role_and_version_headers_are_counted(server: RecordingServer) -> None:
    report = await run_traffic(server.url, PROMPTS, rate_rps=200, duration_s=0.5)
    assert set(report.roles) == {"stable", "canary"}
    assert sum(report.roles.values()) == report.sent
    assert report.roles["stable"] > report.roles["canary"] > 0
    assert report.versions == {"1": report.roles["stable"], "2": report.roles["canary"]}


async def test_errors_are_counted_by_status_timeout_and_connection(
    server: RecordingServer,
) -> None:
    flaky = await run_traffic(f"{server.url}/flaky", PROMPTS, rate_rps=100, duration_s=0.4)
    assert flaky.errors.get("503", 0) > 0 and flaky.ok > 0
    assert flaky.ok + flaky.errors["503"] == flaky.sent
    assert flaky.error_rate == pytest.approx(0.5, abs=0.1)

    slow = await run_traffic(
        f"{server.url}/slow", PROMPTS, rate_rps=20, duration_s=0.2, timeout_s=0.2
    )
    assert slow.errors == {"timeout": slow.sent} and slow.ok == 0

    refused = await run_traffic(
        f"http://127.0.0.1:{free_port()}", PROMPTS, rate_rps=20, duration_s=0.2
    )
    assert refused.errors == {"connection": refused.sent}
    assert refused.latency_p50_ms is None


async def test_progress_is_reported_about_once_a_second(server: RecordingServer) -> None:
    seen: list[TrafficStats] = []
    await run_traffic(server.url, PROMPTS, rate_rps=50, duration_s=1.3, on_progress=seen.append)
    assert 2 <= len(seen) <= 3  # one a second while sending, one at the end
    assert [s.sent for s in seen] == sorted(s.sent for s in seen)
    assert seen[-1].in_flight == 0 and seen[-1].sent == seen[-1].ok


def test_runner_drives_traffic_in_the_background_and_stops_promptly(
    server: RecordingServer,
) -> None:
    run = _run_id()
    runner = TrafficRunner(server.url, PROMPTS, rate_rps=100, headers={RUN_HEADER: run}).start()
    try:
        wait_for("the runner's first 20 requests at the server", lambda: len(server.of(run)) >= 20)
        assert runner.running()
    finally:
        began = time.monotonic()
        report = runner.stop()
        stopped_in = time.monotonic() - began
    # Every answer is immediate, so stop() has nothing to give its grace period to.
    assert stopped_in < STOP_GRACE_S, f"stop() took {stopped_in:.2f} s"
    assert not runner.running()
    assert report.sent >= 20
    assert report.sent == report.ok == len(server.of(run))


def test_runner_stop_cancels_requests_still_in_flight(server: RecordingServer) -> None:
    run = _run_id()
    headers = {RUN_HEADER: run, "x-test-sleep": "30"}
    with TrafficRunner(f"{server.url}/slow", PROMPTS, rate_rps=50, headers=headers) as runner:
        wait_for("5 requests open at the server", lambda: len(server.of(run)) >= 5)
        began = time.monotonic()
        report = runner.stop()
        stopped_in = time.monotonic() - began
    # The answers would take 30 s: stop() gives them its grace period, then cancels them.
    assert 0.9 * STOP_GRACE_S <= stopped_in < 10, f"stop() took {stopped_in:.2f} s"
    assert report.errors.get("cancelled", 0) == report.sent >= 5
    assert report.ok == 0


def test_load_corpus_reads_jsonl_and_says_which_line_is_bad(tmp_path: Path) -> None:
    good = tmp_path / "mine.jsonl"
    good.write_text(
        json.dumps({"id": "a", "input": "hello", "user": "u1", "category": "chat"})
        + "\n\n"
        + json.dumps({"id": 2, "input": "bye"})
        + "\n"
    )
    assert load_corpus(good) == [
        Prompt(id="a", input="hello", user="u1"),
        Prompt(id="2", input="bye"),
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "input": "x"}) + "\n" + '{"id": "b"}\n')
    with pytest.raises(ConfigError, match=r"bad\.jsonl:2: "):
        load_corpus(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_corpus("no-such-corpus")


def test_the_packaged_live_corpus_loads() -> None:
    prompts = load_corpus("live")
    assert len(prompts) >= 300
    assert len({p.id for p in prompts}) == len(prompts)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompts": []}, "no prompts"),
        ({"rate_rps": 0}, "rate_rps"),
        ({"users": 0}, "users"),
    ],
)
async def test_bad_arguments_say_what_is_wrong(kwargs: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {"prompts": PROMPTS, "rate_rps": 10, "users": 5, **kwargs}
    with pytest.raises(ConfigError, match=message):
        await run_traffic("http://127.0.0.1:1", duration_s=1, **arguments)  # type: ignore[arg-type]
