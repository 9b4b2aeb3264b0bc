"""CPU used while a benchmark measures, read from /proc: its own process, another, the machine.

Apart from any one benchmark because client and server share this machine's cores, so any
throughput figure needs to say who was busy.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float | None:
    """user + system CPU seconds of another process, from /proc (Linux); None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICKS


def machine_busy_s() -> float | None:
    """CPU seconds all cores spent busy since boot (everything but idle and iowait)."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    return (sum(values[:8]) - values[3] - values[4]) / TICKS


def settle(idle_cores: float = 0.15, window_s: float = 0.3, timeout_s: float = 15.0) -> float:
    """Wait until the machine uses less than `idle_cores` (a server finishing a backlog would
    otherwise slow the next measurement); returns the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        before = machine_busy_s()
        time.sleep(window_s)
        after = machine_busy_s()
        if before is None or after is None or (after - before) / window_s < idle_cores:
            break
    return time.monotonic() - started


class HostSpeed:
    """How fast this machine runs Python right now, against the fastest seen in this run.

    On the shared host a fixed pure-Python loop takes anywhere from 1x to 2x its best time from
    one second to the next, with no steal time reported; a latency measured in a slow spell says
    more about the neighbours than about the code. `wait_for_fast` holds a measurement until the
    host is within `tolerance` of its best, and every figure is reported with its slowdown.
    """

    def __init__(self, tolerance: float = 1.25) -> None:
        self.tolerance = tolerance
        self.best_ms = min(self.probe_ms() for _ in range(10))

    def probe_ms(self) -> float:
        started = time.perf_counter()
        x = 0
        for i in range(50_000):
            x += i * i % 7
        elapsed = (time.perf_counter() - started) * 1000
        self.best_ms = min(getattr(self, "best_ms", elapsed), elapsed)
        return elapsed

    def slowdown(self) -> float:
        """Now against the best: 1.0 is the fastest seen, 2.0 twice as slow."""
        return min(self.probe_ms() for _ in range(3)) / self.best_ms

    def wait_for_fast(self, timeout_s: float = 20.0) -> float:
        """Wait until the slowdown is within tolerance (or the timeout); returns the slowdown."""
        deadline = time.monotonic() + timeout_s
        while (factor := self.slowdown()) > self.tolerance and time.monotonic() < deadline:
            time.sleep(0.25)
        return factor


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
            process_cpu_s(self.sandbox_pid),
            machine_busy_s(),
        )
        return self

    def __exit__(self, *_: object) -> None:
        wall0, own0, box0, all0 = self._start
        wall = max(time.perf_counter() - wall0, 1e-9)
        self.client = (time.process_time() - own0) / wall
        box1, all1 = process_cpu_s(self.sandbox_pid), machine_busy_s()
        if box0 is not None and box1 is not None:
            self.sandbox = (box1 - box0) / wall
        if all0 is not None and all1 is not None:
            self.others = max(0.0, (all1 - all0) / wall - self.client - (self.sandbox or 0.0))
