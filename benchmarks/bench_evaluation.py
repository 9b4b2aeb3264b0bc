"""Offline evaluation: provider-client throughput, and what the answer cache saves on a rerun.

(a) Closed loop: `concurrency` workers each send one request after another through
`ProviderClient.complete` (no cache) to the real sandbox provider at a fixed latency (100 ms by
default, a fast LLM; `--latency-ms 20` stresses the client's CPU), `sigma=0`, no injected errors.
A client that adds nothing would complete concurrency / latency requests per second; goal:
>= 90% of that bound at every level. Each level plans bound x 2 s of requests and stops after
3 s (a slow level reports how many it finished).
The same requests from a bare aiohttp client, in the same run, are the reference: they show what
the sandbox and this machine allow. Client and sandbox share this machine's cores, so each level
also reports the CPU the client process, the sandbox and everything else used, and names what
limited a level that missed.

(b) A full `evaluate(...)` of the golden, regression and safety suites, candidate `sandbox-good`
against baseline `sandbox-base` (both at 20 ms, sigma 0), with a fresh `ResponseCache` file; then
the same evaluation again with every answer replayed: from the same cache object (memory), and
from a newly opened cache on the same file (SQLite, what a rerun in a new process sees).
Speed-up = first wall time / replay wall time; goal >= 50x.

    python -m benchmarks.bench_evaluation            # ~1 minute
    python -m benchmarks.bench_evaluation --quick    # ~30 s (1 s per level)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.cpu import CpuMeter  # noqa: E402
from canaryflow.contracts import EvalReport, ModelManifest, OfflineGate  # noqa: E402
from canaryflow.errors import ProviderError  # noqa: E402
from canaryflow.evaluation.harness import evaluate  # noqa: E402
from canaryflow.evaluation.suites import Suite, load_suite  # noqa: E402
from canaryflow.local import examples  # noqa: E402
from canaryflow.local.stack import sandbox_server, url_of  # noqa: E402
from canaryflow.providers.cache import ResponseCache  # noqa: E402
from canaryflow.providers.client import ProviderClient, request_parameters  # noqa: E402

LATENCY_S = 0.020
FIXED = f"latency_ms={LATENCY_S * 1000:g},sigma=0,error_rate=0"
LEVELS = (1, 2, 4, 8, 16, 32, 64)
GOAL_FRACTION = 0.90
GOAL_SPEEDUP = 50.0
SUITES = ("golden", "regression", "safety")
EVAL_CONCURRENCY = 32  # what runbook.evaluate_manifests uses
REPLAYS = 3
CAP = 1.5  # a level stops after CAP x its planned seconds
BUSY = 0.85  # a process using this share of one core is taken as CPU-bound


# --------------------------------------------------------------------------- (a) throughput


@dataclass
class Level:
    client: str
    concurrency: int
    target: int  # requests planned: the bound times the seconds per level
    seconds: float = 0.0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    cpu: CpuMeter | None = None

    @property
    def done(self) -> int:
        return len(self.latencies_ms)

    @property
    def rate(self) -> float:
        return self.done / self.seconds if self.seconds else 0.0

    @property
    def bound(self) -> float:
        return self.concurrency / LATENCY_S

    @property
    def fraction(self) -> float:
        return self.rate / self.bound

    @property
    def passed(self) -> bool:
        return self.errors == 0 and self.fraction >= GOAL_FRACTION

    @property
    def cpu_ms_per_request(self) -> float:
        return (self.cpu.client * self.seconds / self.done * 1000) if self.cpu and self.done else 0

    def p50(self) -> float:
        return statistics.median(self.latencies_ms) if self.latencies_ms else float("nan")


async def closed_loop(
    level: Level, call: Callable[[str], Awaitable[float]], prompts: list[str], cap_s: float,
    sandbox_pid: int,
) -> None:  # fmt: skip
    """`concurrency` workers, each sending its next request when the last one returned."""

    async def worker(counter: list[int], total: int, deadline: float, record: bool) -> None:
        while counter[0] < total and time.perf_counter() < deadline:
            i = counter[0]
            counter[0] += 1
            try:
                latency_ms = await call(prompts[i % len(prompts)])
            except (ProviderError, aiohttp.ClientError, TimeoutError):
                level.errors += record
                continue
            if record:
                level.latencies_ms.append(latency_ms)

    c = level.concurrency
    warm = time.perf_counter() + cap_s  # open every connection before measuring
    await asyncio.gather(*(worker([0], 3 * c, warm, False) for _ in range(c)))
    with CpuMeter(sandbox_pid) as meter:
        started = time.perf_counter()
        counter = [0]
        await asyncio.gather(
            *(worker(counter, level.target, started + cap_s, True) for _ in range(c))
        )
        level.seconds = time.perf_counter() - started
    level.cpu = meter


async def provider_client_level(
    url: str, manifest: ModelManifest, prompts: list[str], level: Level, cap_s: float, pid: int
) -> None:
    async with ProviderClient(url, concurrency=level.concurrency, max_retries=0) as client:

        async def call(prompt: str) -> float:
            return (await client.complete(manifest, prompt)).latency_ms

        await closed_loop(level, call, prompts, cap_s, pid)


async def aiohttp_level(
    url: str, manifest: ModelManifest, prompts: list[str], level: Level, cap_s: float, pid: int
) -> None:
    """The reference: the same requests from a bare aiohttp session (no retries, no parsing)."""
    params = request_parameters(manifest)
    bodies = {
        p: json.dumps(
            {
                "model": manifest.origin.model,
                "messages": [{"role": "user", "content": manifest.render(p)}],
                **params,
            }
        )
        for p in prompts
    }
    headers = {"content-type": "application/json"}
    connector = aiohttp.TCPConnector(limit=level.concurrency)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def call(prompt: str) -> float:
            started = time.perf_counter()
            async with session.post(
                f"{url}/v1/chat/completions", data=bodies[prompt], headers=headers
            ) as response:
                await response.read()
                if response.status != 200:
                    raise aiohttp.ClientError(f"HTTP {response.status}")
            return (time.perf_counter() - started) * 1000

        await closed_loop(level, call, prompts, cap_s, pid)


def throughput(
    url: str, prompts: list[str], seconds: float, sandbox_pid: int
) -> list[tuple[Level, Level]]:
    manifest = examples.manifest("1.1", f"sandbox-base@{FIXED}")
    cap_s = CAP * seconds
    rows = []
    for concurrency in LEVELS:
        target = max(20, round(concurrency / LATENCY_S * seconds))
        measured = Level("ProviderClient", concurrency, target)
        asyncio.run(provider_client_level(url, manifest, prompts, measured, cap_s, sandbox_pid))
        time.sleep(0.2)
        reference = Level("aiohttp", concurrency, target)
        asyncio.run(aiohttp_level(url, manifest, prompts, reference, cap_s, sandbox_pid))
        time.sleep(0.2)
        rows.append((measured, reference))
    return rows


def limit(measured: Level, reference: Level, at_low: Level) -> str:
    """What most plausibly held a missed level back, from the reference and the CPU shares."""
    if measured.errors:
        return f"{measured.errors} failed requests"
    cpu, ref_cpu = measured.cpu or CpuMeter(0), reference.cpu or CpuMeter(0)
    reasons = []
    if reference.passed:
        added = measured.p50() - reference.p50()
        reasons.append(
            f"the client: +{added:.1f} ms per request at p50 over a bare aiohttp client, which "
            f"reaches {reference.fraction:.0%} on the same sandbox"
        )
    if cpu.client >= BUSY:
        growth = measured.cpu_ms_per_request / max(at_low.cpu_ms_per_request, 1e-9)
        reasons.append(
            f"client process CPU-bound ({cpu.client:.2f} core; {measured.cpu_ms_per_request:.1f}"
            f" ms CPU per request, {growth:.1f}x the figure at concurrency {at_low.concurrency})"
        )
    busy_box = max(cpu.sandbox or 0.0, ref_cpu.sandbox or 0.0)
    if busy_box >= BUSY:
        reasons.append(f"sandbox CPU-bound ({busy_box:.2f} core, one uvicorn process)")
    total = ref_cpu.client + (ref_cpu.sandbox or 0.0) + (ref_cpu.others or 0.0)
    if not reference.passed and total >= 1.7:
        reasons.append(f"both cores busy in the reference run ({total:.1f} cores)")
    others = max(cpu.others or 0.0, ref_cpu.others or 0.0)
    if others >= 0.3:
        reasons.append(f"other processes took {others:.1f} core")
    if not reasons or (not reference.passed and cpu.client < BUSY and busy_box < BUSY):
        reasons.append(
            f"the latency floor: p50 {reference.p50():.1f} ms with aiohttp, "
            f"{measured.p50():.1f} ms through ProviderClient, for a {LATENCY_S * 1000:g} ms "
            "sleep (HTTP round trip, event-loop timers)"
        )
    return "; ".join(reasons)


def throughput_table(rows: list[tuple[Level, Level]], seconds: float) -> str:
    head = (
        f"{'conc':>4} {'requests':>9} {'req/s':>6} {'bound':>6} {'% bound':>7} {'p50 ms':>6} "
        f"{'cpu ms/req':>10} {'client':>6} {'sandbox':>7} {'others':>6}  {'verdict':<7}"
        f"  {'aiohttp ref':>11} {'%':>4}"
    )
    lines = [
        f"(a) ProviderClient.complete throughput, sandbox at a fixed {LATENCY_S * 1000:g} ms, "
        "closed loop, no cache",
        f"    requests planned = bound x {seconds:g} s (a level stops after {CAP * seconds:g} s: "
        "requests = done/planned); bound = concurrency / "
        f"{LATENCY_S:g} s; goal >= {GOAL_FRACTION:.0%} of it",
        "    client/sandbox/others: CPU in cores (1.0 = one core busy); aiohttp ref: a bare "
        "aiohttp client, same sandbox and requests, same run",
        "",
        head,
        "-" * len(head),
    ]

    def cores(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    for m, ref in rows:
        cpu = m.cpu or CpuMeter(0)
        lines.append(
            f"{m.concurrency:>4} {f'{m.done}/{m.target}':>9} {m.rate:>6.0f} {m.bound:>6.0f} "
            f"{m.fraction:>7.1%} {m.p50():>6.1f} {m.cpu_ms_per_request:>10.2f} "
            f"{cores(cpu.client):>6} {cores(cpu.sandbox):>7} {cores(cpu.others):>6}  "
            f"{'PASS' if m.passed else 'MISS':<7}  {ref.rate:>11.0f} {ref.fraction:>4.0%}"
        )
    at_low = rows[min(3, len(rows) - 1)][0]
    for m, ref in rows:
        if not m.passed:
            lines.append(f"  MISS at {m.concurrency}: limited by {limit(m, ref, at_low)}")
    passed = sum(m.passed for m, _ in rows)
    lines.append(f"  {passed}/{len(rows)} levels at >= {GOAL_FRACTION:.0%} of the bound")
    return "\n".join(lines)


# --------------------------------------------------------------------------- (b) cache replay


@dataclass
class EvalRun:
    label: str
    wall_s: float
    report: EvalReport


async def timed_eval(
    label: str, url: str, cache: ResponseCache, suites: list[Suite], pair: tuple[ModelManifest, ...]
) -> EvalRun:
    candidate, baseline = pair
    async with ProviderClient(url, concurrency=EVAL_CONCURRENCY, cache=cache) as client:
        started = time.perf_counter()
        report = await evaluate(candidate, baseline, suites, client, OfflineGate())
        wall = time.perf_counter() - started
    return EvalRun(label, wall, report)


def cache_replay(url: str, home: Path) -> tuple[EvalRun, list[EvalRun], list[EvalRun]]:
    suites = [load_suite(name) for name in SUITES]
    pair = (
        examples.manifest("1.2", f"sandbox-good@{FIXED}"),
        examples.manifest("1.1", f"sandbox-base@{FIXED}"),
    )
    path = home / "eval-cache.db"
    cache = ResponseCache(path)
    try:
        first = asyncio.run(timed_eval("first run", url, cache, suites, pair))
        memory = [
            asyncio.run(timed_eval("replay, same cache", url, cache, suites, pair))
            for _ in range(REPLAYS)
        ]
    finally:
        cache.close()
    from_disk = []
    for _ in range(REPLAYS):
        reopened = ResponseCache(path)  # empty memory: every answer comes from SQLite
        try:
            from_disk.append(
                asyncio.run(timed_eval("replay, reopened file", url, reopened, suites, pair))
            )
        finally:
            reopened.close()
    return first, memory, from_disk


def replay_table(first: EvalRun, memory: list[EvalRun], from_disk: list[EvalRun]) -> str:
    answers = 2 * len(first.report.items)
    head = f"{'run':<34} {'wall ms':>8} {'cached':>7} {'decision':>8} {'speed-up':>8}  verdict"
    lines = [
        f"(b) evaluate() of {', '.join(SUITES)}: {len(first.report.items)} items x 2 models = "
        f"{answers} answers, client concurrency {EVAL_CONCURRENCY}, sandbox at "
        f"{LATENCY_S * 1000:g} ms",
        f"    speed-up = first wall time / replay wall time (median of {REPLAYS}); "
        f"goal >= {GOAL_SPEEDUP:g}x",
        "",
        head,
        "-" * len(head),
        f"{first.label:<34} {first.wall_s * 1000:>8.1f} {first.report.cached:>7} "
        f"{first.report.decision.value:>8} {'-':>8}  baseline",
    ]
    for runs in (memory, from_disk):
        wall = statistics.median(r.wall_s for r in runs)
        speedup = first.wall_s / wall
        complete = all(r.report.cached == answers for r in runs)
        same = all(r.report.decision is first.report.decision for r in runs)
        verdict = "PASS" if speedup >= GOAL_SPEEDUP and complete and same else "MISS"
        walls_ms = [r.wall_s * 1000 for r in runs]
        spread = f"({min(walls_ms):.1f}-{max(walls_ms):.1f})"
        lines.append(
            f"{runs[0].label + ' ' + spread:<34} {wall * 1000:>8.1f} {runs[0].report.cached:>7} "
            f"{runs[0].report.decision.value:>8} {speedup:>7.0f}x  {verdict}"
        )
        if not complete:
            lines.append(f"  {runs[0].label}: not every answer came from the cache")
        if not same:
            lines.append(f"  {runs[0].label}: the decision differs from the first run")
    ideal = answers / (EVAL_CONCURRENCY / LATENCY_S)
    lines.append(
        f"  context: a client at its bound ({EVAL_CONCURRENCY} / {LATENCY_S:g} s) would finish the "
        f"first run in {ideal * 1000:.0f} ms; the replays against that: "
        + ", ".join(
            f"{ideal / statistics.median(r.wall_s for r in runs):.0f}x"
            for runs in (memory, from_disk)
        )
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~1 s per level instead of ~2 s")
    parser.add_argument(
        "--latency-ms",
        type=float,
        default=100.0,
        help="the sandbox's fixed latency (100 ms: a fast LLM; 20 ms stresses the client's CPU)",
    )
    args = parser.parse_args(argv)
    global LATENCY_S, FIXED
    LATENCY_S = args.latency_ms / 1000
    FIXED = f"latency_ms={args.latency_ms:g},sigma=0,error_rate=0"
    seconds = 1.0 if args.quick else 2.0
    started = time.monotonic()
    prompts = [item.input for name in SUITES for item in load_suite(name).items]
    with tempfile.TemporaryDirectory(prefix="bench-evaluation-") as tmp:
        home = Path(tmp)
        sandbox = sandbox_server(home)
        try:
            sandbox.start(timeout_s=60)
            assert sandbox.process is not None
            url = url_of(sandbox)
            rows = throughput(url, prompts, seconds, sandbox.process.pid)
            first, memory, from_disk = cache_replay(url, home)
        finally:
            sandbox.stop()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"Offline evaluation benchmark ({os.cpu_count()} cores; load average {load:.2f})\n")
    print(throughput_table(rows, seconds))
    print()
    print(replay_table(first, memory, from_disk))
    print(f"\ntotal {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
