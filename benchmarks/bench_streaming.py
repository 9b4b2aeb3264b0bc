"""Streamed chat and a TLS provider through the data plane: what Envoy and the model services add.

Open loop at 200 req/s (`benchmarks/loadgen.py`'s generator, which also notes when each answer's
first body byte arrived). The provider is `benchmarks/stream_responder.py`: a streamed answer's
first token leaves with its head, the rest 5 ms later, so time to first token (TTFT) through the
path minus TTFT from the provider directly is what the path adds to the wait a user feels.

Rows, each run 3 times (median [min-max], never the best), with the host's slowdown per run:
- streamed, provider direct / Envoy 95/5 + model services + 100% mirror (Unix sockets);
- unstreamed, a provider over HTTPS (a throwaway CA, the services trust it through their
  providers file's `ca_bundle`) direct / through the same path.
Goals (issue 9): added TTFT p50 <= 1.5 ms and p99 <= 5 ms at 200 req/s, 5% canary + 100% mirror.

    python -m benchmarks.bench_streaming [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import bench_dataplane as dataplane  # noqa: E402
from benchmarks.cpu import HostSpeed, settle  # noqa: E402
from benchmarks.loadgen import OpenLoop, _Connection  # noqa: E402
from canaryflow.local.processes import ManagedProcess, free_port, http_ok  # noqa: E402

RATE = 200
GOAL_TTFT_P50_MS, GOAL_TTFT_P99_MS = 1.5, 5.0
STREAMED = json.dumps(
    {"model": "x", "messages": [{"role": "user", "content": dataplane.PROMPT}], "stream": True}
).encode()
UNSTREAMED = json.dumps(
    {"model": "x", "messages": [{"role": "user", "content": dataplane.PROMPT}]}
).encode()


class _FirstByte(_Connection):
    """Notes when the first body byte of each answer arrived (its time to first token)."""

    def send(self, request: bytes, scheduled: float) -> None:
        self.first_seen = False
        super().send(request, scheduled)

    def on_body(self, body: bytes) -> None:
        if not self.first_seen and self.scheduled is not None:
            self.first_seen = True
            loop = self.generator
            assert isinstance(loop, TtftLoop)
            loop.ttft_ms.append((time.perf_counter() - self.scheduled) * 1000)


class TtftLoop(OpenLoop):
    def __init__(self, url: str, body: bytes) -> None:
        super().__init__(url, body)
        self.ttft_ms: list[float] = []

    async def _open_and_send(self, scheduled: float) -> None:
        try:
            _, connection = await asyncio.get_running_loop().create_connection(
                lambda: _FirstByte(self), self.host, self.port
            )
        except OSError:
            self.record(scheduled, ok=False)
            return
        connection.send(self.request, scheduled)


@dataclass
class Run:
    errors: int
    latencies_ms: list[float]
    ttft_ms: list[float]
    slowdown: float


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Row:
    path: str
    streamed: bool
    runs: list[Run] = field(default_factory=list)

    def median(self, which: str, q: float) -> float:
        return statistics.median(_pct(getattr(r, which), q) for r in self.runs)

    def spread(self, which: str, q: float) -> str:
        values = [_pct(getattr(r, which), q) for r in self.runs]
        return f"{statistics.median(values):6.2f} [{min(values):5.2f}-{max(values):5.2f}]"


def measure(url: str, row: Row, seconds: float, host: HostSpeed, repeat: int) -> Row:
    body = STREAMED if row.streamed else UNSTREAMED
    for _ in range(repeat):
        settle()
        before = host.wait_for_fast()
        asyncio.run(TtftLoop(url, body).run(RATE, 1.0))  # warm the pools
        loop = TtftLoop(url, body)
        tally = asyncio.run(loop.run(RATE, seconds))
        slowdown = max(before, host.slowdown())
        row.runs.append(Run(tally.errors, tally.latencies_ms, loop.ttft_ms, slowdown))
    return row


def responder(home: Path, name: str, tls: tuple[Path, Path] | None = None) -> tuple[str, int]:
    port = free_port()
    scheme = "https" if tls else "http"
    args = [sys.executable, "-m", "benchmarks.stream_responder", "--port", str(port)]
    if tls:
        args += ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])]
    process = ManagedProcess(
        name,
        args,
        home / f"{name}.log",
        _answers(f"{scheme}://127.0.0.1:{port}/health", tls),
        cwd=ROOT,
    ).start(timeout_s=30)
    assert process.process is not None
    return f"{scheme}://127.0.0.1:{port}", process.process.pid


def _answers(url: str, tls: tuple[Path, Path] | None) -> object:
    if tls is None:
        return http_ok(url)
    import httpx

    def ready() -> bool:
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(url, verify=False, timeout=1).status_code == 200
        return False

    return ready


def tls_service(
    stack: ExitStack, home: Path, name: str, url: str, ca: Path, extra: list[str]
) -> dataplane.Service:
    """A model service whose providers file names the HTTPS provider and trusts its CA."""
    providers = home / f"providers-{name}.yaml"
    providers.write_text(
        f"providers:\n  sandbox:\n    base_url: {url}/v1\n    auth: none\n    ca_bundle: {ca}\n"
    )
    providers.chmod(0o600)
    port = free_port()
    manifests = dataplane.write_manifests(home)
    args = [
        "canaryflow.dataplane.serve", "--service", dataplane.SERVICE, "--port", str(port),
        "--admin-port", str(free_port()), "--providers", str(providers),
        "--default-version", "1",
        "--manifest", f"1={manifests['1']}", "--manifest", f"2={manifests['2']}",
        "--store", str(home / f"{name}.db"), "--uds", str(home / "sockets" / f"{name}.sock"),
        *extra,
    ]  # fmt: skip
    process = dataplane.python_server(name, args, port, home)
    stack.callback(process.stop)
    assert process.process is not None
    return dataplane.Service(port, process.process.pid, home / "sockets" / f"{name}.sock")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1.5 s runs instead of 3 s")
    parser.add_argument("--repeat", type=int, default=3, help="runs per row (at least 3)")
    parser.add_argument(
        "--check-sample",
        type=float,
        default=None,
        help="the services' --check-sample (scales the live checkers' rates; 0: none). Default: "
        "as shipped (the default checkers, which here call the stand-in provider)",
    )
    args = parser.parse_args(argv)
    repeat, seconds = max(3, args.repeat), 1.5 if args.quick else 3.0
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    host = HostSpeed()
    started = time.monotonic()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-streaming-") as tmp, ExitStack() as stack:
        home = Path(tmp)
        from tests.certificates import make_certificates

        certs = make_certificates(home / "tls")
        plain, _ = responder(home, "responder")
        secure, _ = responder(home, "responder-tls", (certs.cert, certs.key))
        extra = [] if args.check_sample is None else ["--check-sample", str(args.check_sample)]
        primary = dataplane.service(stack, home, "primary", plain, "http1", extra)
        shadow = dataplane.service(stack, home, "shadow", plain, "http1", extra)
        tls_primary = tls_service(stack, home, "tls-primary", secure, certs.ca, extra)
        tls_shadow = tls_service(stack, home, "tls-shadow", secure, certs.ca, extra)
        path = "Envoy 95/5 + services + 100% mirror"

        def run(url: str, row: Row) -> None:
            rows.append(measure(url, row, seconds, host, repeat))

        run(f"{plain}/v1/chat/completions", Row("provider direct", streamed=True))
        with dataplane.envoy(home, primary, shadow, mirror=True) as (target, _pid):
            run(target, Row(path, streamed=True))
            run(target, Row(f"{path}, HTTP provider", streamed=False))
        with dataplane.envoy(home, tls_primary, tls_shadow, mirror=True) as (target, _pid):
            run(target, Row(f"{path}, HTTPS provider", streamed=False))
    _report(rows, seconds, repeat, time.monotonic() - started)
    return 0


def _report(rows: list[Row], seconds: float, repeat: int, total_s: float) -> None:
    print(
        f"\nStreamed chat and a TLS upstream, open loop at {RATE} req/s, {seconds:.1f} s per run, "
        f"{repeat} runs per row: median [min-max] ms; host = each run's slowdown"
    )
    head = f"{'path':<52} {'mode':<6} {'err':>3} {'TTFT p50':>20} {'TTFT p99':>20} "
    head += f"{'total p50':>20} {'total p99':>20}  host"
    print(head)
    for row in rows:
        errors = sum(r.errors for r in row.runs)
        hosts = "/".join(f"{r.slowdown:.2f}" for r in row.runs)
        mode = "stream" if row.streamed else "whole"
        ttft = (
            f"{row.spread('ttft_ms', 0.5)} {row.spread('ttft_ms', 0.99)}"
            if row.streamed
            else f"{'-':>20} {'-':>20}"
        )
        total = f"{row.spread('latencies_ms', 0.5)} {row.spread('latencies_ms', 0.99)}"
        print(f"{row.path:<52} {mode:<6} {errors:>3} {ttft} {total}  {hosts}")
    direct, streamed, plain, secure = rows
    added50 = streamed.median("ttft_ms", 0.5) - direct.median("ttft_ms", 0.5)
    added99 = streamed.median("ttft_ms", 0.99) - direct.median("ttft_ms", 0.99)
    tls50 = secure.median("latencies_ms", 0.5) - plain.median("latencies_ms", 0.5)
    tls99 = secure.median("latencies_ms", 0.99) - plain.median("latencies_ms", 0.99)
    print("\nGoals:")
    for text, met in (
        (f"added TTFT p50, streamed, 5% canary + 100% mirror: {added50:.2f} ms "
         f"(<= {GOAL_TTFT_P50_MS})", added50 <= GOAL_TTFT_P50_MS),
        (f"added TTFT p99, same: {added99:.2f} ms (<= {GOAL_TTFT_P99_MS})",
         added99 <= GOAL_TTFT_P99_MS),
    ):  # fmt: skip
        print(f"  {'MET   ' if met else 'MISSED'} {text}")
    print(f"  (no goal) the HTTPS upstream adds p50 {tls50:.2f} ms, p99 {tls99:.2f} ms over HTTP")
    print(f"total {total_s:.0f} s")


if __name__ == "__main__":
    raise SystemExit(main())
