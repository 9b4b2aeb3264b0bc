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
            process_cpu_s(self.sandbox_pid),
            _machine_busy_s(),
        )
        return self

    def __exit__(self, *_: object) -> None:
        wall0, own0, box0, all0 = self._start
        wall = max(time.perf_counter() - wall0, 1e-9)
        self.client = (time.process_time() - own0) / wall
        box1, all1 = process_cpu_s(self.sandbox_pid), _machine_busy_s()
        if box0 is not None and box1 is not None:
            self.sandbox = (box1 - box0) / wall
        if all0 is not None and all1 is not None:
            self.others = max(0.0, (all1 - all0) / wall - self.client - (self.sandbox or 0.0))
