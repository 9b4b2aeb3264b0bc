"""Offline evaluation: provider-client throughput, and what the answer cache saves on a rerun.

(a) Closed loop: `concurrency` workers each send one request after another through
`ProviderClient.complete` (no cache) to the real sandbox provider at a FIXED 20 ms latency
(`sigma=0`, no injected errors). A client that adds nothing would complete
concurrency / 0.020 s requests per second; goal: >= 90% of that bound at every level. Client and
sandbox share this machine's cores, so each level also reports the CPU the client process, the
sandbox process and everything else used, and names what limited a level that missed.

(b) A full `evaluate(...)` of the golden, regression and safety suites, candidate `sandbox-good`
against baseline `sandbox-base` (both at 20 ms, sigma 0), with a fresh `ResponseCache` file; then
the same evaluation again with every answer replayed: from the same cache object (memory), and
from a newly opened cache on the same file (SQLite, what a rerun in a new process sees).
Speed-up = first wall time / replay wall time; goal >= 50x.

    python -m benchmarks.bench_evaluation            # ~1 minute
    python -m benchmarks.bench_evaluation --quick    # ~30 s
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from canaryflow import examples  # noqa: E402
from canaryflow.cache import ResponseCache  # noqa: E402
from canaryflow.contracts import EvalReport, ModelManifest, OfflineGate  # noqa: E402
from canaryflow.errors import ProviderError  # noqa: E402
from canaryflow.evaluation.harness import evaluate  # noqa: E402
from canaryflow.evaluation.suites import Suite, load_suite  # noqa: E402
from canaryflow.providers import ProviderClient  # noqa: E402
from canaryflow.stack import sandbox_server, url_of  # noqa: E402

LATENCY_S = 0.020
FIXED = f"latency_ms={LATENCY_S * 1000:g},sigma=0,error_rate=0"
LEVELS = (1, 2, 4, 8, 16, 32, 64)
GOAL_FRACTION = 0.90
GOAL_SPEEDUP = 50.0
SUITES = ("golden", "regression", "safety")
EVAL_CONCURRENCY = 32  # what runbook.evaluate_manifests uses
REPLAYS = 3
BUSY = 0.85  # a process using this share of one core is taken as CPU-bound
TICKS = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- CPU accounting


def _process_cpu_s(pid: int) -> float | None:
    """user + system CPU seconds of another process, from /proc (Linux); None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICKS


def _machine_busy_s() -> float | None:
    """CPU seconds all cores spent busy since boot (everything but idle and iowait)."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    return (sum(values[:8]) - values[3] - values[4]) / TICKS


@dataclass
class CpuMeter:
    """CPU used during one measurement, in cores: this process, the sandbox, everything else."""

    sandbox_pid: int
    client: float = 0.0
    sandbox: float | None = None
    others: float | None = None
    _start: tuple[float, float, float | None, float | None] = (0.0, 0.0, None, None)

    def __enter__(self) -> CpuMeter:
        self._start = (
            time.perf_counter(),
            time.process_time(),
            _process_cpu_s(self.sandbox_pid),
            _machine_busy_s(),
        )
        return self

    def __exit__(self, *_: object) -> None:
        wall0, own0, box0, all0 = self._start
        wall = max(time.perf_counter() - wall0, 1e-9)
        self.client = (time.process_time() - own0) / wall
        box1, all1 = _process_cpu_s(self.sandbox_pid), _machine_busy_s()
        if box0 is not None and box1 is not None:
            self.sandbox = (box1 - box0) / wall
        if all0 is not None and all1 is not None:
            self.others = max(0.0, (all1 - all0) / wall - self.client - (self.sandbox or 0.0))


# --------------------------------------------------------------------------- (a) throughput


@dataclass
class Level:
    concurrency: int
    requests: int
    seconds: float = 0.0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    cpu: CpuMeter | None = None

    @property
    def rate(self) -> float:
        return len(self.latencies_ms) / self.seconds if self.seconds else 0.0

    @property
    def bound(self) -> float:
        return self.concurrency / LATENCY_S

    @property
    def fraction(self) -> float:
        return self.rate / self.bound

    @property
    def passed(self) -> bool:
        return self.errors == 0 and self.fraction >= GOAL_FRACTION

    def p50(self) -> float:
        return statistics.median(self.latencies_ms) if self.latencies_ms else float("nan")

    def limit(self) -> str:
        """What most plausibly held this level back (from the CPU shares measured)."""
        cpu = self.cpu
        if self.passed or cpu is None:
            return ""
        if self.errors:
            return f"{self.errors} failed requests"
        reasons = []
        if cpu.client >= BUSY:
            reasons.append("client CPU-bound (one core: httpx + asyncio + pydantic)")
        if cpu.sandbox is not None and cpu.sandbox >= BUSY:
            reasons.append("sandbox CPU-bound (one uvicorn process)")
        total = cpu.client + (cpu.sandbox or 0.0) + (cpu.others or 0.0)
        if not reasons and total >= 1.7:
            reasons.append("both cores busy (client + sandbox + other processes)")
        if cpu.others is not None and cpu.others >= 0.3:
            reasons.append(f"other processes took {cpu.others:.1f} core")
        if not reasons:
            added = self.p50() - LATENCY_S * 1000
            reasons.append(f"per-request overhead ({added:.1f} ms over the 20 ms at p50)")
        return "; ".join(reasons)


async def run_level(
    url: str, manifest: ModelManifest, prompts: list[str], level: Level, sandbox_pid: int
) -> None:
    async with ProviderClient(url, concurrency=level.concurrency, max_retries=0) as client:

        async def worker(next_index: list[int], total: int, record: bool) -> None:
            while next_index[0] < total:
                i = next_index[0]
                next_index[0] += 1
                try:
                    completion = await client.complete(manifest, prompts[i % len(prompts)])
                except ProviderError:
                    level.errors += record
                    continue
                if record:
                    level.latencies_ms.append(completion.latency_ms)

        # Warm-up: open every connection and let the sandbox cache the profile.
        warm = [0]
        await asyncio.gather(
            *(worker(warm, 3 * level.concurrency, False) for _ in range(level.concurrency))
        )
        counter = [0]
        with CpuMeter(sandbox_pid) as meter:
            started = time.perf_counter()
            await asyncio.gather(
                *(worker(counter, level.requests, True) for _ in range(level.concurrency))
            )
            level.seconds = time.perf_counter() - started
        level.cpu = meter


def throughput(url: str, prompts: list[str], seconds: float, sandbox_pid: int) -> list[Level]:
    manifest = examples.manifest("1.1", f"sandbox-base@{FIXED}")
    levels = []
    for concurrency in LEVELS:
        level = Level(concurrency, requests=max(20, round(concurrency / LATENCY_S * seconds)))
        asyncio.run(run_level(url, manifest, prompts, level, sandbox_pid))
        levels.append(level)
        time.sleep(0.2)
    return levels


def throughput_table(levels: list[Level], seconds: float) -> str:
    head = (
        f"{'conc':>4} {'requests':>8} {'req/s':>7} {'bound':>7} {'% bound':>7} {'p50 ms':>6} "
        f"{'err':>3} {'cpu client':>10} {'sandbox':>7} {'others':>6}  verdict"
    )
    lines = [
        f"(a) ProviderClient.complete throughput, sandbox at a fixed {LATENCY_S * 1000:g} ms, "
        f"closed loop, ~{seconds:g} s per level at the bound",
        f"    bound = concurrency / {LATENCY_S:g} s; goal >= {GOAL_FRACTION:.0%} of it; "
        "CPU in cores (1.0 = one core busy)",
        "",
        head,
        "-" * len(head),
    ]

    def cores(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    for lv in levels:
        cpu = lv.cpu or CpuMeter(0)
        verdict = "PASS" if lv.passed else "MISS"
        lines.append(
            f"{lv.concurrency:>4} {lv.requests:>8} {lv.rate:>7.0f} {lv.bound:>7.0f} "
            f"{lv.fraction:>7.1%} {lv.p50():>6.1f} {lv.errors:>3} {cores(cpu.client):>10} "
            f"{cores(cpu.sandbox):>7} {cores(cpu.others):>6}  {verdict}"
        )
    misses = [lv for lv in levels if not lv.passed]
    for lv in misses:
        lines.append(f"  MISS at {lv.concurrency}: limited by {lv.limit()}")
    passed = len(levels) - len(misses)
    lines.append(f"  {passed}/{len(levels)} levels at >= {GOAL_FRACTION:.0%} of the bound")
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
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~1 s per level instead of ~2 s")
    args = parser.parse_args(argv)
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
            levels = throughput(url, prompts, seconds, sandbox.process.pid)
            first, memory, from_disk = cache_replay(url, home)
        finally:
            sandbox.stop()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"Offline evaluation benchmark ({os.cpu_count()} cores; load average {load:.2f})\n")
    print(throughput_table(levels, seconds))
    print()
    print(replay_table(first, memory, from_disk))
    print(f"\ntotal {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
