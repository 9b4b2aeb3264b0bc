"""Start a server process, wait until it answers, stop it and everything it spawned.

Each server gets its own process group (some, like `mlflow server`, fork workers), a free port
chosen by the OS, and a log file; `stop()` terminates the whole group and escalates to SIGKILL.
It inherits this process's environment except the credentials it does not need (`withhold`:
the keys a providers file names go to the model services only).

A parent that is killed outright (SIGKILL, the OOM killer) runs no cleanup, so every group also
goes on the books of a guardian: a small process of its own, started with the first server,
that reads "+GROUP" / "-GROUP" lines on a pipe from this process. When the pipe closes (this
process has ended, however it ended) or the guardian gets SIGTERM, it terminates every group
still on its books (SIGTERM, then SIGKILL after a grace period) and exits. This covers the
servers' own workers too, as long as they stay in the server's process group. Not covered:
a guardian killed with SIGKILL itself, a worker that moves to a new session or group, and a
server killed in the few microseconds between its fork and its "+GROUP" line.
(`prctl(PR_SET_PDEATHSIG)` is not used: Linux sends it when the *thread* that forked the child
ends, and servers are started from short-lived pool threads; it would also reach the direct
child only, not its workers.)
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

from canaryflow.errors import StackError

GUARDIAN_GRACE_S = 5.0
_GUARDIAN_SCRIPT = """
import os, signal, sys, time

groups = set()


def alive(group):
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def end(*_):
    left = set()
    for group in list(groups):
        try:
            os.killpg(group, signal.SIGTERM)
            left.add(group)
        except OSError:
            pass
    deadline = time.monotonic() + GRACE
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = {group for group in left if alive(group)}
    for group in left:
        try:
            os.killpg(group, signal.SIGKILL)
        except OSError:
            pass
    os._exit(0)


signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGHUP, signal.SIG_IGN)
signal.signal(signal.SIGTERM, end)
for line in sys.stdin.buffer:
    try:
        group = int(line[1:])
    except ValueError:
        continue
    if line[:1] == b"+":
        groups.add(group)
    else:
        groups.discard(group)
end()
"""


class _Guardian:
    """Kills the process groups on its books once this process is gone (see the module doc)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._groups: set[int] = set()

    def watch(self, group: int) -> None:
        with self._lock:
            self._groups.add(group)
            self._send(f"+{group}\n")

    def release(self, group: int) -> None:
        with self._lock:
            self._groups.discard(group)
            self._send(f"-{group}\n")

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def _send(self, line: str) -> None:
        """Best effort: a guardian that has died is replaced once, and told every group."""
        try:
            pipe = self._pipe()
            pipe.write(line.encode())
            pipe.flush()
        except OSError:
            self._process = None
            with contextlib.suppress(OSError):
                self._pipe().flush()

    def _pipe(self) -> IO[bytes]:
        if self._process is None or self._process.poll() is not None:
            script = _GUARDIAN_SCRIPT.replace("GRACE", repr(GUARDIAN_GRACE_S))
            self._process = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", script],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # a terminal's Ctrl-C or hangup does not reach it
                env={k: v for k, v in os.environ.items() if k in ("PATH", "LD_LIBRARY_PATH")},
            )
            if self._groups:
                assert self._process.stdin is not None
                self._process.stdin.write(
                    "".join(f"+{group}\n" for group in sorted(self._groups)).encode()
                )
        assert self._process.stdin is not None
        return self._process.stdin


_GUARDIAN = _Guardian()
_local = threading.local()
# Environment variables holding credentials (the keys a providers file names, the webhook
# secret): a child inherits one only if it names it in `needs`. Children otherwise get this
# process's whole environment (PATH, proxies, locale, a virtualenv's variables).
_WITHHELD: set[str] = set()
_WITHHELD_LOCK = threading.Lock()


def withhold(names: Iterable[str]) -> None:
    """From now on, servers started by this process inherit none of `names` from its
    environment unless they ask for them (`ManagedProcess.needs`): Prefect, MLflow, Envoy and
    Prometheus have no use for a provider's key, and `/proc/PID/environ` is readable by every
    process of the same user. Names are never forgotten: a key once set stays a key."""
    with _WITHHELD_LOCK:
        _WITHHELD.update(names)


def child_environment(needs: Collection[str] = ()) -> dict[str, str]:
    """This process's environment without the withheld variables a child does not need."""
    with _WITHHELD_LOCK:
        dropped = _WITHHELD.difference(needs)
    return {name: value for name, value in os.environ.items() if name not in dropped}


def guardian_pid() -> int | None:
    """The guardian's process id, once a server was started (None before)."""
    return _GUARDIAN.pid


@contextlib.contextmanager
def cancelled_when(check: Callable[[], bool]) -> Iterator[None]:
    """`ManagedProcess.start` calls made in this thread give up, stopping what they started,
    as soon as `check()` is true (checked every 0.1 s while a server is not yet ready)."""
    previous = getattr(_local, "check", None)
    _local.check = check
    try:
        yield
    finally:
        _local.check = previous


def _cancelled() -> bool:
    check: Callable[[], bool] | None = getattr(_local, "check", None)
    return check is not None and check()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def http_ok(url: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return httpx.get(url, timeout=1.0).status_code < 500
        except httpx.HTTPError:
            return False

    return check


@dataclass
class ManagedProcess:
    name: str
    command: Sequence[str]
    log_path: Path
    ready: Callable[[], bool]
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    needs: Collection[str] = ()  # withheld variables (see `withhold`) this server inherits

    def start(self, timeout_s: float = 60.0) -> ManagedProcess:
        if _cancelled():
            raise StackError(f"{self.name} not started: stopping")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        process = subprocess.Popen(
            list(self.command),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**child_environment(self.needs), **self.env},
            cwd=self.cwd,
            start_new_session=True,
        )
        self.process = process
        _GUARDIAN.watch(process.pid)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                self.stop()
                raise StackError(
                    f"{self.name} exited with code {process.returncode} while starting; "
                    f"see {self.log_path}:\n{self.tail()}"
                )
            if _cancelled():
                self.stop()
                raise StackError(f"{self.name}: start abandoned, stopping")
            if self.ready():
                return self
            time.sleep(0.1)
        self.stop()
        raise StackError(
            f"{self.name} did not answer within {timeout_s:.0f} s; see {self.log_path}"
        )

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, grace_s: float = 5.0) -> None:
        process = self.process
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace_s)
        # Workers forked by the server may outlive its parent: the group goes down with SIGKILL.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace_s)
            _GUARDIAN.release(process.pid)  # reaped: its number may be reused from now on
        self.process = None

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
