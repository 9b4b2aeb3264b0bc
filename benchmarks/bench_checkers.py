"""The live checkers' cost: judge pipeline throughput, and what judging every answer costs users.

Two measurements, each run 3 times (median [min-max], never the best):

- **Judge throughput**: the checker process (`quality.remote.RemoteCheckers`, 16 workers) fed
  as fast as it takes items, the sandbox's `sandbox-judge` (two rubrics: two calls per item) as
  the judge; items per second and each verdict's latency from offer to result.
- **Users' latency, 100% vs 0% judge sampling, in the same run**: two model services in front of
  the same canned provider (`benchmarks/responder.py`), one judging every answer (LLM judge at
  `sample_rate: 1` plus patterns), one with no checks (`--check-sample 0`); open loop at
  `RATE` req/s straight to each service, the two measured alternately. Goal (issue 10): no
  change beyond noise. Here the judge (the sandbox) and the checker process share the machine's
  2 cores with the service and the load generator; a hosted judge would not.

    python -m benchmarks.bench_checkers [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import bench_dataplane as dataplane  # noqa: E402
from benchmarks.cpu import HostSpeed, settle  # noqa: E402
from benchmarks.loadgen import OpenLoop  # noqa: E402
from canaryflow.contracts import (  # noqa: E402
    AuthStyle,
    LlmJudgeChecker,
    ProviderConfig,
    ProvidersFile,
)
from canaryflow.local.processes import ManagedProcess, free_port, http_ok  # noqa: E402
from canaryflow.quality.remote import RemoteCheckers  # noqa: E402
from canaryflow.quality.verdicts import CheckItem, CheckResult  # noqa: E402

RATE = 100
ITEMS = 600
BODY = json.dumps(
    {
        "model": "x",
        "messages": [
            {"role": "system", "content": "Paris is the capital of France."},
            {"role": "user", "content": dataplane.PROMPT},
        ],
    }
).encode()


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):7.2f} [{min(values):6.2f}-{max(values):6.2f}]"


def start_process(home: Path, name: str, module: str, port: int) -> ManagedProcess:
    return ManagedProcess(
        name,
        [sys.executable, "-m", module, "--port", str(port)],
        home / f"{name}.log",
        http_ok(f"http://127.0.0.1:{port}/health"),
        cwd=ROOT,
    ).start(timeout_s=60)


async def judge_throughput(judge_url: str) -> tuple[float, float, float, int]:
    """Items per second, verdict latency p50 and p99 (ms), and failed items."""
    providers = ProvidersFile(
        providers={"judge": ProviderConfig(base_url=f"{judge_url}/v1", auth=AuthStyle.NONE)}
    )
    config = LlmJudgeChecker(provider="judge", model="sandbox-judge", sample_rate=1.0)
    done: list[tuple[CheckResult, float]] = []
    remote = RemoteCheckers([config], providers, lambda r: done.append((r, time.perf_counter())))
    await remote.start()
    try:
        offered: dict[str, float] = {}
        started = time.perf_counter()
        for i in range(ITEMS):
            item = CheckItem(
                f"r{i}", "What is the capital of France?", "Paris.", "Paris is in France.",
                role="canary",
            )  # fmt: skip
            offered[item.request_id] = time.perf_counter()
            remote.submit_to(item)
            if i % 50 == 49:
                await asyncio.sleep(0)
        while len(done) < ITEMS and time.perf_counter() - started < 120:
            await asyncio.sleep(0.01)
        elapsed = max(at for _, at in done) - started
        latencies = [(at - offered[r.item.request_id]) * 1000 for r, at in done]
        failed = sum(1 for r, _ in done if r.unchecked)
        return len(done) / elapsed, _pct(latencies, 0.5), _pct(latencies, 0.99), failed
    finally:
        await remote.aclose()


def write_policy(home: Path) -> Path:
    """The judge on every answer (two rubric calls each) and the patterns checker."""
    policy = {
        "checkers": [
            {"kind": "llm_judge", "provider": "judge", "model": "sandbox-judge",
             "sample_rate": 1.0, "timeout_s": 5},
            {"kind": "patterns", "sample_rate": 1.0},
        ]
    }  # fmt: skip
    path = home / "judge-everything.json"
    path.write_text(json.dumps(policy))
    return path


def users(url: str, seconds: float, host: HostSpeed) -> tuple[float, float, float, int]:
    settle()
    slowdown = host.wait_for_fast()
    asyncio.run(OpenLoop(url, BODY).run(RATE, 1.0))  # warm the pools
    tally = asyncio.run(OpenLoop(url, BODY).run(RATE, seconds))
    slowdown = max(slowdown, host.slowdown())
    return _pct(tally.latencies_ms, 0.5), _pct(tally.latencies_ms, 0.99), slowdown, tally.errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 s user runs instead of 5 s")
    parser.add_argument("--repeat", type=int, default=3, help="runs per row (at least 3)")
    args = parser.parse_args(argv)
    repeat, seconds = max(3, args.repeat), 2.0 if args.quick else 5.0
    host = HostSpeed()
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-checkers-") as tmp, ExitStack() as stack:
        home = Path(tmp)
        judge_port, provider_port = free_port(), free_port()
        stack.callback(start_process(home, "judge", "canaryflow.sandbox", judge_port).stop)
        provider = start_process(home, "provider", "benchmarks.responder", provider_port)
        stack.callback(provider.stop)
        judge_url = f"http://127.0.0.1:{judge_port}"

        throughput = [asyncio.run(judge_throughput(judge_url)) for _ in range(repeat)]

        judged_args = ["--provider-url", f"judge={judge_url}", "--policy", str(write_policy(home))]
        provider_url = f"http://127.0.0.1:{provider_port}"
        services = {
            "0% (no checks)": dataplane.service(
                stack, home, "unjudged", provider_url, "http1", ["--check-sample", "0"]
            ),
            "100% judged": dataplane.service(
                stack, home, "judged", provider_url, "http1", judged_args
            ),
        }
        runs: dict[str, list[tuple[float, float, float, int]]] = {name: [] for name in services}
        for _ in range(repeat):  # alternately, so a slow spell hits both
            for name, service in services.items():
                url = f"http://127.0.0.1:{service.port}/v1/chat/completions"
                runs[name].append(users(url, seconds, host))

    print(f"\nJudge pipeline (checker process, 16 workers, sandbox-judge, 2 rubrics), {ITEMS} "
          f"items per run, {repeat} runs: median [min-max]")  # fmt: skip
    print(f"  items/s        {_spread([t[0] for t in throughput])}")
    print(f"  verdict p50 ms {_spread([t[1] for t in throughput])}")
    print(f"  verdict p99 ms {_spread([t[2] for t in throughput])}")
    print(f"  failed items   {[t[3] for t in throughput]}")
    print(f"\nUsers' latency, open loop {RATE} req/s straight to a model service, "
          f"{seconds:g} s per run, {repeat} runs each, alternating: median [min-max] ms; "
          "host = slowdown")  # fmt: skip
    print(f"{'sampling':<16} {'p50':>22} {'p99':>22} {'errors':>7}  host")
    for name, rows in runs.items():
        hosts = "/".join(f"{r[2]:.2f}" for r in rows)
        errors = sum(r[3] for r in rows)
        print(f"{name:<16} {_spread([r[0] for r in rows]):>22} "
              f"{_spread([r[1] for r in rows]):>22} {errors:>7}  {hosts}")  # fmt: skip
    base, judged = (runs[name] for name in services)
    for q, index in (("p50", 0), ("p99", 1)):
        b = [r[index] for r in base]
        j = [r[index] for r in judged]
        overlap = min(j) <= max(b)
        delta = statistics.median(j) - statistics.median(b)
        print(f"  {q}: judged - unjudged {delta:+.2f} ms; ranges "
              f"{'overlap (within noise)' if overlap else 'apart (a real change)'}")  # fmt: skip
    print(f"total {time.monotonic() - began:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
