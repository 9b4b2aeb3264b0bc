"""Run every benchmark in turn, each in its own process, and keep their output.

    python -m benchmarks.run              # everything (~15-18 minutes on 2 cores; detection ~9)
    python -m benchmarks.run --quick      # shorter variants where a benchmark has one
    python -m benchmarks.run --only bench_release --only detection

Each benchmark's output is printed as it comes and collected in `benchmarks/results/latest.md`
(git-ignored). A benchmark that crashes makes the exit code 1; a missed goal does not (the
tables say PASS/MISS).
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from canaryflow.settings import missing_mlflow_client_env

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "benchmarks"
RESULTS = HERE / "results" / "latest.md"
ORDER = ("bench_evaluation", "bench_release", "bench_rollback", "bench_dataplane")
EXTRA = ("detection",)  # benchmarks whose module is not named bench_*
TIMEOUT_S = 900.0


@dataclass
class Outcome:
    name: str
    command: list[str]
    returncode: int
    seconds: float
    output: str


def discover() -> list[str]:
    present = sorted(p.stem for p in HERE.glob("bench_*.py"))
    present += [n for n in EXTRA if (HERE / f"{n}.py").exists()]
    return [n for n in ORDER if n in present] + [n for n in present if n not in ORDER]


def supports_quick(name: str) -> bool:
    return "--quick" in (HERE / f"{name}.py").read_text(encoding="utf-8")


def run_one(name: str, quick: bool) -> Outcome:
    command = [sys.executable, "-m", f"benchmarks.{name}"]
    if quick and supports_quick(name):
        command.append("--quick")
    shown = " ".join(["python", *command[1:]])
    print(f"\n===== {name}: {shown}", flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    lines: list[str] = []
    with subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        errors="replace",
    ) as process:
        # SIGINT, not SIGTERM: the benchmark's finally blocks then stop the servers it started.
        watchdog = threading.Timer(TIMEOUT_S, process.send_signal, (signal.SIGINT,))
        watchdog.start()
        assert process.stdout is not None
        for line in process.stdout:
            print(line, end="", flush=True)
            lines.append(line)
        returncode = process.wait()
        watchdog.cancel()
    if time.monotonic() - started >= TIMEOUT_S:
        lines.append(f"\n[benchmarks.run] interrupted after {TIMEOUT_S:.0f} s\n")
    seconds = time.monotonic() - started
    print(f"===== {name}: exit {returncode}, {seconds:.0f} s", flush=True)
    return Outcome(name, [shown], returncode, seconds, "".join(lines))


def git_commit() -> str:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True
        )
    except OSError:
        return "unknown"
    commit = result.stdout.strip() or "unknown"
    return commit + (" (uncommitted changes)" if dirty.stdout.strip() else "")


def markdown(outcomes: list[Outcome], quick: bool, load_before: float) -> str:
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        "# Benchmark results",
        "",
        f"- when: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; commit {git_commit()}",
        f"- machine: {os.cpu_count()} cores, {platform.system()} {platform.machine()}, "
        f"Python {platform.python_version()}; load average {load_before:.2f} before, "
        f"{load_after:.2f} after",
        f"- mode: {'--quick' if quick else 'full'}",
        "",
        "| benchmark | exit | seconds |",
        "|---|---|---|",
    ]
    for o in outcomes:
        lines.append(f"| {o.name} | {o.returncode} | {o.seconds:.0f} |")
    for o in outcomes:
        lines += ["", f"## {o.name}", "", f"`{o.command[0]}`", "", "```text"]
        lines += [o.output.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick where supported")
    parser.add_argument(
        "--only", action="append", default=[], metavar="NAME", help="e.g. bench_release"
    )
    args = parser.parse_args(argv)
    os.environ.update(missing_mlflow_client_env(os.environ))  # an entry point, like the CLI
    names = discover()
    unknown = [n for n in args.only if n not in names]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; available: {', '.join(names)}")
    names = [n for n in names if n in args.only] if args.only else names
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    outcomes = [run_one(name, args.quick) for name in names]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(markdown(outcomes, args.quick, load_before), encoding="utf-8")
    print(f"\n{'benchmark':<20} {'exit':>4} {'seconds':>7}")
    for o in outcomes:
        print(f"{o.name:<20} {o.returncode:>4} {o.seconds:>7.0f}")
    print(f"written to {RESULTS.relative_to(ROOT)}")
    return 1 if any(o.returncode != 0 for o in outcomes) else 0


if __name__ == "__main__":
    raise SystemExit(main())
