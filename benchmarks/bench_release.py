"""The release DAG's own overhead: everything a release costs beyond the evaluation work.

An embedded control plane (Prefect server, MLflow, sandbox; no data plane) gets a signed
champion; then `flows.release.release` runs for candidates the offline gate rejects
(`sandbox-hallucinating` at latency 0, no injected errors, shadow disabled, no synthetic traffic):
preflight, publish, offline evaluation, ledger, registry status, all through the real Prefect API
and MLflow. Overhead = flow wall time - the evaluation's own time (`EvalReport.seconds`), which
is read by wrapping `runbook.evaluate_offline` in this process (the flow runs in-process).
For context, the same Prefect server runs a no-op flow of 10 no-op tasks.
Goal: overhead under 10 s per release.

    python -m benchmarks.bench_release            # ~1 minute (the stack takes ~20 s to start)
    python -m benchmarks.bench_release --quick    # 2 releases instead of 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # the table, not every task's state

from prefect.settings import PREFECT_API_URL, temporary_settings  # noqa: E402

from canaryflow import connections, runbook  # noqa: E402
from canaryflow.contracts import (  # noqa: E402
    ApprovalConfig,
    Endpoints,
    EvalReport,
    ReleaseRecord,
    ReleaseSpec,
    ShadowConfig,
)
from canaryflow.loading import load_policy  # noqa: E402
from canaryflow.local import examples  # noqa: E402
from canaryflow.local.stack import EmbeddedStack  # noqa: E402
from canaryflow.registry.signing import generate_keypair, sign  # noqa: E402

FAST = "latency_ms=0,sigma=0,error_rate=0"
CHAMPION_MODEL = f"sandbox-base@{FAST}"
CANDIDATE_MODEL = f"sandbox-hallucinating@{FAST}"
POLICY_FILE = ROOT / "deployments" / "policies" / "default.yaml"
GOAL_OVERHEAD_S = 10.0
NOOP_TASKS = 10


@dataclass
class ReleaseTiming:
    version: str
    record: ReleaseRecord
    wall_s: float
    eval_s: float  # EvalReport.seconds: the harness, from first call to report
    eval_call_s: float  # runbook.evaluate_offline: + suite loading, cache file, event loop

    @property
    def overhead_s(self) -> float:
        return self.wall_s - self.eval_s

    @property
    def stage(self) -> str:
        failed = [s for s in self.record.stages if s.outcome == "failed"]
        return failed[0].key if failed else "-"


class EvalRecorder:
    """Wraps runbook.evaluate_offline (the task calls it through the module) to keep reports."""

    def __init__(self) -> None:
        self.calls: list[tuple[EvalReport, float]] = []
        self._original = runbook.evaluate_offline

    def __enter__(self) -> EvalRecorder:
        original = self._original

        def recording(*args: Any, **kwargs: Any) -> EvalReport:
            started = time.perf_counter()
            report = original(*args, **kwargs)
            self.calls.append((report, time.perf_counter() - started))
            return report

        runbook.evaluate_offline = recording  # type: ignore[assignment]
        return self

    def __exit__(self, *_: object) -> None:
        runbook.evaluate_offline = self._original  # type: ignore[assignment]


def noop_timings(runs: int) -> list[float]:
    """Prefect's fixed cost on this server: one flow run with 10 task runs that do nothing."""
    from prefect import flow, task

    @task
    def nothing(i: int) -> int:
        return i

    @flow(name="bench-noop")
    def noop() -> int:
        return sum(nothing(i) for i in range(NOOP_TASKS))

    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        noop()
        timings.append(time.perf_counter() - started)
    return timings


def releases(endpoints: Endpoints, key: Path, versions: list[str]) -> list[ReleaseTiming]:
    from flows.release import release  # after PREFECT_API_URL points at our server

    policy = load_policy(POLICY_FILE)
    timings = []
    with EvalRecorder() as recorder:
        for version in versions:
            spec = ReleaseSpec(
                service=examples.SERVICE,
                candidate=sign(examples.manifest(version, CANDIDATE_MODEL), key),
                shadow=ShadowConfig(enabled=False),
                policy=policy,
                approval=ApprovalConfig(timeout_s=5, poll_s=1, default_action="reject"),
                traffic=None,
            )
            before = len(recorder.calls)
            started = time.perf_counter()
            record = release(spec=spec, endpoints=endpoints)
            wall = time.perf_counter() - started
            report, call_s = recorder.calls[-1] if len(recorder.calls) > before else (None, 0.0)
            timings.append(
                ReleaseTiming(version, record, wall, report.seconds if report else 0.0, call_s)
            )
    return timings


def table(rows: list[ReleaseTiming], noop: list[float], startup_s: float) -> str:
    head = (
        f"{'release':<8} {'decision':<9} {'stopped at':<13} {'flow s':>7} {'eval s':>7} "
        f"{'eval call s':>11} {'overhead s':>10} {'goal':>6}  verdict"
    )
    lines = [
        "Release DAG overhead (control plane only: Prefect server, MLflow, sandbox; waits at 0)",
        f"candidate {CANDIDATE_MODEL} vs champion {CHAMPION_MODEL}; shadow off, no traffic",
        "overhead = flow wall time - EvalReport.seconds; 'eval call' adds suite loading and the",
        "cache file around the harness",
        "",
        head,
        "-" * len(head),
    ]
    for r in rows:
        ok = r.overhead_s < GOAL_OVERHEAD_S and r.record.decision == "rejected"
        lines.append(
            f"v{r.version:<7} {r.record.decision:<9} {r.stage:<13} {r.wall_s:>7.2f} "
            f"{r.eval_s:>7.2f} {r.eval_call_s:>11.2f} {r.overhead_s:>10.2f} "
            f"{'<' + format(GOAL_OVERHEAD_S, 'g'):>6}  {'PASS' if ok else 'MISS'}"
        )
    overheads = [r.overhead_s for r in rows]
    lines.append(
        f"overhead median {statistics.median(overheads):.2f} s, worst {max(overheads):.2f} s "
        f"(goal < {GOAL_OVERHEAD_S:g} s): {'PASS' if max(overheads) < GOAL_OVERHEAD_S else 'MISS'}"
    )
    lines.append(
        f"context: no-op flow with {NOOP_TASKS} no-op tasks on the same server: "
        + ", ".join(f"{t:.2f}" for t in noop)
        + " s (first run includes flow registration)"
    )
    lines.append(f"context: control plane start {startup_s:.1f} s (not counted)")
    if rows:
        first = rows[0].record
        lines.append(f"stages of v{rows[0].version} (ledger timestamps, s since the first):")
        t0 = first.stages[0].at
        for s in first.stages:
            lines.append(f"  {(s.at - t0).total_seconds():6.2f}  {s.key:<14} {s.outcome}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 releases instead of 3")
    args = parser.parse_args(argv)
    versions = ["1.2", "1.3"] if args.quick else ["1.2", "1.3", "1.4"]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-release-") as tmp:
        stack = EmbeddedStack(Path(tmp), ui=False)
        try:
            t0 = time.perf_counter()
            endpoints = stack.start()
            startup_s = time.perf_counter() - t0
            keys = generate_keypair(Path(endpoints.keys_dir), "bench", [examples.SERVICE])
            registry = connections.registry(endpoints.mlflow_uri)
            champion = registry.publish(
                sign(examples.manifest("1.1", CHAMPION_MODEL), keys.private_path)
            )
            registry.promote(champion.service, champion.version)
            with temporary_settings(updates={PREFECT_API_URL: endpoints.prefect_api_url}):
                noop = noop_timings(3)
                rows = releases(endpoints, keys.private_path, versions)
        finally:
            stack.stop()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\n({os.cpu_count()} cores; load average {load:.2f} at the end)\n")
    print(table(rows, noop, startup_s))
    print(f"\ntotal {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
