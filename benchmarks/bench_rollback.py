"""How fast does a rollback take the canary out of live traffic?

Steady open-loop load (200 req/s, aiohttp) runs through a real Envoy at 50% canary; then
`rollback()` is called from a thread while the load continues. The upstream logs each arrival
(monotonic clock, shared by all processes on the machine) with the role Envoy assigned, so we
measure from the call to the LAST request that reached the canary, and how long the call took
(write + confirmation through the admin stats). Goal: under 50 ms.

Run: `python -m benchmarks.bench_rollback [runs]` from the repository root (about 1 s a run).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx

from canaryflow.contracts import Routes
from canaryflow.dataplane.envoy_routes import EnvoyRoutes
from canaryflow.local.envoy import EnvoyProxy
from canaryflow.local.processes import ManagedProcess, free_port, http_ok

REPO = Path(__file__).resolve().parents[1]
ECHO = REPO / "tests" / "integration" / "test_envoy.py"  # doubles as the echo upstream
RATE = 200.0
BEFORE_S, AFTER_S = 0.4, 0.3
GOAL_MS = 50.0


async def drive(url: str, seconds: float, session: aiohttp.ClientSession) -> int:
    """Open loop: a request every 1/RATE s whatever the answers do; returns errors seen."""
    errors = 0

    async def one() -> None:
        nonlocal errors
        try:
            async with session.post(f"{url}/v1/chat/completions", json={}) as response:
                await response.read()
                errors += response.status != 200
        except aiohttp.ClientError:
            errors += 1

    tasks = []
    start = time.monotonic()
    for i in range(int(seconds * RATE)):
        await asyncio.sleep(max(0.0, start + i / RATE - time.monotonic()))
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)
    return errors


async def one_run(
    controller: EnvoyRoutes, url: str, records_url: str
) -> tuple[float, float | None, int, int]:
    controller.set_routes(Routes(service="bench", stable="1", canary="2", weight=50))
    httpx.get(records_url, params={"clear": "1"})
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:
        load = asyncio.create_task(drive(url, BEFORE_S + AFTER_S, session))
        await asyncio.sleep(BEFORE_S)
        called = time.monotonic()
        await asyncio.to_thread(controller.rollback)
        returned = time.monotonic()
        errors = await load
    arrivals = httpx.get(records_url, params={"clear": "1"}).json()
    canary = [a["t"] for a in arrivals if a["headers"].get("x-canaryflow-role") == "canary"]
    last = max((t - called for t in canary if t >= called), default=None)
    late = sum(t > returned for t in canary)
    return returned - called, last, late, errors


def summary(values: list[float]) -> str:
    if not values:
        return "      -        -        -"
    p95 = statistics.quantiles(values, n=20, method="inclusive")[-1] if len(values) > 1 else 0
    return f"{statistics.median(values):7.1f}  {p95:7.1f}  {max(values):7.1f}"


async def main(runs: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-rollback-") as tmp:
        home = Path(tmp)
        echo_port = free_port()
        echo = ManagedProcess(
            name="echo upstream",
            command=[sys.executable, str(ECHO), str(echo_port)],
            log_path=home / "echo.log",
            ready=http_ok(f"http://127.0.0.1:{echo_port}/_health"),
            env={"PYTHONPATH": str(REPO)},
            cwd=REPO,
        )
        upstream = ("127.0.0.1", echo_port)
        proxy = EnvoyProxy(
            home / "envoy",
            service="bench",
            listen_port=free_port(),
            admin_port=free_port(),
            upstreams={"stable": upstream, "canary": upstream, "shadow": upstream},
            initial_stable="1",
        )
        try:
            echo.start(timeout_s=30)
            proxy.start()
            controller = EnvoyRoutes(proxy.home, proxy.admin_url, service="bench")
            calls, lasts, late, errors, none_after = [], [], 0, 0, 0
            for _ in range(runs):
                took, last, late_run, errors_run = await one_run(
                    controller, proxy.url, f"http://127.0.0.1:{echo_port}/_records"
                )
                calls.append(took * 1000)
                none_after += last is None
                lasts.append((last or 0.0) * 1000)
                late += late_run
                errors += errors_run
        finally:
            proxy.stop()
            echo.stop()
    print(f"rollback under {RATE:.0f} req/s open-loop load at 50% canary, {runs} runs (ms)")
    print(f"{'measure':44} {'median':>7}  {'p95':>7}  {'max':>7}")
    print(f"{'rollback() call (write + confirm live)':44} {summary(calls)}")
    print(f"{'call start -> last request at the canary':44} {summary(lasts)}")
    print(f"runs where the canary got nothing after the call (counted as 0 ms): {none_after}")
    print(f"canary arrivals after rollback() returned: {late}; client errors: {errors}")
    worst = max(calls + lasts)
    verdict = "meets" if worst < GOAL_MS else "MISSES"
    print(f"goal: under {GOAL_MS:.0f} ms -> {verdict} (worst {worst:.1f} ms)")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 10))
