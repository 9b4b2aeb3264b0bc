"""Data-plane latency: what the model service (and Envoy in front of it) adds to a provider call.

Open-loop load (aiohttp): requests leave on schedule whether or not earlier ones returned, and
latency is measured from the scheduled send time, so a stall shows up instead of hiding
(no coordinated omission). Paths, all against the sandbox provider at `latency_ms=0,sigma=0`:

- provider direct
- service direct, aiohttp forwarder (the shipped one) and httpx forwarder (100/200 req/s only)
- Envoy 95/5 (stable/canary) + service, without and with a 100% mirror to a shadow service

"Added" = path minus provider direct at the same rate. Goals: added p50 <= 1.5 ms and added
p99 <= 5 ms at 200 req/s with 5% canary and 100% mirror; >= 1,500 req/s sustained without
errors. Every process runs on this machine: the load generator competes with what it measures.

    python benchmarks/bench_dataplane.py            # ~2-3 minutes
    python benchmarks/bench_dataplane.py --quick    # ~30 s
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from canaryflow.contracts import ModelManifest, Origin, Price, Routes  # noqa: E402
from canaryflow.processes import ManagedProcess, free_port, http_ok  # noqa: E402

SERVICE = "bench"
PROMPT = "What is the capital of France?"
SANDBOX_MODEL = "sandbox-base@latency_ms=0,sigma=0,error_rate=0"
GOAL_RATE = 200
GOAL_P50_MS, GOAL_P99_MS, GOAL_SUSTAINED = 1.5, 5.0, 1500
CLEAN_P99_MS = 25.0


@dataclass
class Run:
    path: str
    rate: float
    sent: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    duration_s: float = 0.0

    @property
    def achieved(self) -> float:
        return len(self.latencies_ms) / self.duration_s if self.duration_s else 0.0

    def pct(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        values = sorted(self.latencies_ms)
        return values[min(len(values) - 1, int(q * len(values)))]

    @property
    def clean(self) -> bool:
        return (
            self.errors == 0
            and self.achieved >= 0.95 * self.rate
            and self.pct(0.99) <= CLEAN_P99_MS
        )


# --------------------------------------------------------------------------- load


async def open_loop(url: str, rate: float, duration_s: float, path: str) -> Run:
    run = Run(path, rate)
    # The provider reads the model name; the service ignores it (the release decides).
    body = json.dumps({"model": SANDBOX_MODEL, "messages": [{"role": "user", "content": PROMPT}]})
    headers = {"content-type": "application/json"}
    timeout = aiohttp.ClientTimeout(total=10)
    connector = aiohttp.TCPConnector(limit=2000)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(scheduled: float) -> None:
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    ok = response.status == 200
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            if ok:
                run.latencies_ms.append((time.perf_counter() - scheduled) * 1000)
            else:
                run.errors += 1

        total = int(rate * duration_s)
        tasks = []
        start = time.perf_counter()
        for i in range(total):
            scheduled = start + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(scheduled)))
        await asyncio.gather(*tasks)
        run.sent = total
        run.duration_s = duration_s
    return run


def measure(url: str, path: str, rate: float, duration_s: float) -> Run:
    asyncio.run(open_loop(url, rate, min(1.0, duration_s / 2), path))  # warm pools and caches
    time.sleep(0.3)
    run = asyncio.run(open_loop(url, rate, duration_s, path))
    time.sleep(0.5)  # uvicorn finishes abandoned handlers: let a backlog drain
    return run


def highest_clean(url: str, path: str, ladder: list[int], duration_s: float) -> tuple[int, Run]:
    best, last = 0, None
    for rate in ladder:
        last = measure(url, path, rate, duration_s)
        if not last.clean:
            break
        best = rate
    assert last is not None
    return best, last


# --------------------------------------------------------------------------- processes


def python_server(name: str, args: list[str], port: int, home: Path) -> ManagedProcess:
    return ManagedProcess(
        name,
        [sys.executable, "-m", *args],
        home / f"{name}.log",
        http_ok(f"http://127.0.0.1:{port}/health"),
        cwd=ROOT,
    ).start(timeout_s=60)


def write_manifests(home: Path) -> dict[str, Path]:
    files = {}
    for version in ("1", "2"):
        manifest = ModelManifest(
            model_id=f"{SERVICE}/sandbox-docs-v1.{version}+ds-1",
            created_at=datetime(2026, 1, 1, tzinfo=UTC),
            origin=Origin(provider="sandbox", model=SANDBOX_MODEL),
            prompt_template="Answer briefly.\n\nQuestion: {input}",
            tokenizer_version="t1",
            embedding_version="e1",
            license="apache-2.0",
            price=Price(input_per_1k=0.1, output_per_1k=0.3),
        )
        files[version] = home / f"manifest-{version}.json"
        files[version].write_text(manifest.model_dump_json())
    return files


def service(stack: ExitStack, home: Path, name: str, provider: str, forwarder: str) -> int:
    port = free_port()
    manifests = write_manifests(home)
    args = [
        "canaryflow.dataplane.service", "--service", SERVICE, "--port", str(port),
        "--provider-url", f"sandbox={provider}", "--default-version", "1",
        "--manifest", f"1={manifests['1']}", "--manifest", f"2={manifests['2']}",
        "--store", str(home / f"{name}.db"), "--forwarder", forwarder,
    ]  # fmt: skip
    stack.callback(python_server(name, args, port, home).stop)
    return port


@contextmanager
def envoy(home: Path, primary: int, shadow: int, mirror: bool) -> Iterator[str]:
    from canaryflow.dataplane.envoy import EnvoyProxy, EnvoyTrafficController

    proxy = EnvoyProxy(
        home / ("envoy-mirror" if mirror else "envoy"),
        service=SERVICE,
        listen_port=free_port(),
        admin_port=free_port(),
        upstreams={
            "stable": ("127.0.0.1", primary),
            "canary": ("127.0.0.1", primary),
            "shadow": ("127.0.0.1", shadow),
        },
        initial_stable="1",
    ).start()
    try:
        routes = Routes(service=SERVICE, stable="1", canary="2", weight=5.0)
        if mirror:
            routes = routes.model_copy(update={"shadow": "2", "mirror_percent": 100.0})
        EnvoyTrafficController(proxy).set_routes(routes)
        yield f"{proxy.url}/v1/chat/completions"
    finally:
        proxy.stop()


def envoy_available() -> bool:
    try:
        import canaryflow.dataplane.envoy as module
    except ImportError:
        return False
    return hasattr(module, "EnvoyProxy") and hasattr(module, "EnvoyTrafficController")


# --------------------------------------------------------------------------- report


def table(runs: list[Run], direct: dict[float, Run]) -> str:
    head = (
        f"{'path':<34} {'rate':>6} {'achieved':>8} {'err':>4} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'+p50':>6} {'+p99':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in runs:
        base = direct.get(r.rate)
        added50 = f"{r.pct(0.5) - base.pct(0.5):6.2f}" if base and r is not base else "     -"
        added99 = f"{r.pct(0.99) - base.pct(0.99):6.2f}" if base and r is not base else "     -"
        lines.append(
            f"{r.path:<34} {r.rate:>6.0f} {r.achieved:>8.0f} {r.errors:>4} "
            f"{r.pct(0.5):>7.2f} {r.pct(0.99):>7.2f} {added50} {added99}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~30 s instead of ~2-3 minutes")
    args = parser.parse_args(argv)
    seconds = 1.5 if args.quick else 3.0
    rates = [100, 200] if args.quick else [100, 200, 500]
    ladder = [500, 1000, 1500] if args.quick else [500, 750, 1000, 1500, 2000, 3000]
    started = time.monotonic()
    runs: list[Run] = []
    ceilings: list[tuple[str, int, Run]] = []

    with tempfile.TemporaryDirectory(prefix="bench-dataplane-") as tmp, ExitStack() as stack:
        home = Path(tmp)
        sandbox_port = free_port()
        sandbox = python_server(
            "sandbox",
            ["canaryflow.sandbox", "--host", "127.0.0.1", "--port", str(sandbox_port)],
            sandbox_port,
            home,
        )
        stack.callback(sandbox.stop)
        provider = f"http://127.0.0.1:{sandbox_port}"
        primary = service(stack, home, "service-aiohttp", provider, "aiohttp")
        httpx_port = service(stack, home, "service-httpx", provider, "httpx")

        def url(port: int) -> str:
            return f"http://127.0.0.1:{port}/v1/chat/completions"

        paths: list[tuple[str, Callable[[], str], list[int]]] = [
            ("provider direct", lambda: url(sandbox_port), rates),
            ("service direct (aiohttp)", lambda: url(primary), rates),
            ("service direct (httpx)", lambda: url(httpx_port), [r for r in rates if r <= 200]),
        ]
        for name, target, path_rates in paths:
            for rate in path_rates:
                runs.append(measure(target(), name, rate, seconds))
        for name, port in (
            ("provider direct", sandbox_port),
            ("service direct (aiohttp)", primary),
        ):
            best, last = highest_clean(url(port), name, ladder, seconds)
            ceilings.append((name, best, last))

        if envoy_available():
            shadow_port = service(stack, home, "service-shadow", provider, "aiohttp")
            for mirror in (False, True):
                name = "Envoy 95/5 + service" + (" + 100% mirror" if mirror else "")
                with envoy(home, primary, shadow_port, mirror) as target:
                    for rate in rates:
                        runs.append(measure(target, name, rate, seconds))
                    best, last = highest_clean(target, name, ladder, seconds)
                    ceilings.append((name, best, last))
        else:
            print("canaryflow/dataplane/envoy.py not available: Envoy paths skipped")

    direct = {r.rate: r for r in runs if r.path == "provider direct"}
    print(f"\nData plane, open loop, {seconds:.1f} s per point, sandbox at latency 0")
    print("(2 shared cores; other work on the machine shows up in the tails)\n")
    print(table(runs, direct))
    print(f"\nHighest clean rate (no errors, >= 95% achieved, p99 <= {CLEAN_P99_MS:.0f} ms):")
    for name, best, last in ceilings:
        stop = f"first unclean: {last.rate:.0f} req/s, p99 {last.pct(0.99):.1f} ms, "
        stop += f"{last.errors} errors, achieved {last.achieved:.0f}"
        print(f"  {name:<40} {best:>5} req/s   ({stop if not last.clean else 'ladder top'})")
    goal = [r for r in runs if r.path.endswith("mirror") and r.rate == GOAL_RATE]
    if goal and GOAL_RATE in direct:
        added50 = goal[0].pct(0.5) - direct[GOAL_RATE].pct(0.5)
        added99 = goal[0].pct(0.99) - direct[GOAL_RATE].pct(0.99)
        verdict = "MET" if added50 <= GOAL_P50_MS and added99 <= GOAL_P99_MS else "MISSED"
        print(
            f"\nGoal at {GOAL_RATE} req/s, 5% canary + 100% mirror: added p50 {added50:.2f} ms "
            f"(<= {GOAL_P50_MS}), added p99 {added99:.2f} ms (<= {GOAL_P99_MS}): {verdict}"
        )
    sustained = max((best for name, best, _ in ceilings if name != "provider direct"), default=0)
    print(f"Sustained goal >= {GOAL_SUSTAINED} req/s through the service: {sustained} req/s")
    print(f"total {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
