"""`canaryflow up` stopped by a signal leaves nothing running; `serve` and `sandbox` take their
own options.

`up` runs as a real process. Its descendants are found by walking the parent links in
`/proc/*/stat` and remembered with their start time (a number the kernel may hand to another
process later is not mistaken for a survivor); every server runs in a process group of its own,
so the check also covers workers forked after the walk: no process may be left in any of those
groups. Linux only (`/proc`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from canaryflow.contracts import Endpoints
from canaryflow.local.processes import GUARDIAN_GRACE_S, free_port
from canaryflow.local.stack import model_service
from canaryflow.settings import STACK_FILE, load_endpoints
from tests.waiting import wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="walks /proc (Linux)"),
]

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "canaryflow.app.cli"]
START_S = 240.0  # the control plane on a loaded two-core machine: Prefect and MLflow take long
STOP_S = 30.0  # each group: SIGTERM, 5 s grace, SIGKILL; all groups at once


# ------------------------------------------------------------------ processes, from /proc


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    group: int
    state: str
    started: int  # clock ticks after boot: tells a process from a later one with its number


def read(pid: int) -> Proc | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the name may hold spaces and parentheses
    return Proc(pid, int(fields[1]), int(fields[2]), fields[0], int(fields[19]))


def every_process() -> list[Proc]:
    found = (read(int(entry)) for entry in os.listdir("/proc") if entry.isdigit())
    return [proc for proc in found if proc is not None]


def descendants(root: int) -> list[Proc]:
    procs = every_process()
    children: dict[int, list[Proc]] = {}
    for proc in procs:
        children.setdefault(proc.ppid, []).append(proc)
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child.pid)
    return found


def alive(proc: Proc) -> bool:
    now = read(proc.pid)
    return now is not None and now.started == proc.started and now.state != "Z"


def survivors(recorded: list[Proc], groups: set[int]) -> list[Proc]:
    """Recorded processes still running, and any live process in one of the children's groups."""
    left = {proc.pid: proc for proc in recorded if alive(proc)}
    for proc in every_process():
        if proc.group in groups and proc.state != "Z":
            left.setdefault(proc.pid, proc)
    return list(left.values())


def command_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:160].decode()
    except OSError:
        return "?"


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not "in use"
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# ------------------------------------------------------------------ `canaryflow up` as a process


@dataclass
class Up:
    process: subprocess.Popen[bytes]
    home: Path
    log: Path
    seen: list[Proc]

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def direct_children(self) -> list[Proc]:
        return [proc for proc in descendants(self.process.pid) if proc.ppid == self.process.pid]

    def record(self) -> tuple[list[Proc], set[int]]:
        """Its descendants now, and the process groups of its direct children."""
        found = descendants(self.process.pid)
        self.seen.extend(found)
        groups = {proc.group for proc in found if proc.ppid == self.process.pid}
        return found, groups

    def ready(self) -> Endpoints:
        """Once stack.json is written and every part answers."""

        def answering() -> Endpoints | None:
            assert self.process.poll() is None, f"up exited early:\n{self.output}"
            if not (self.home / STACK_FILE).exists():
                return None
            endpoints = load_endpoints(self.home)
            try:
                return endpoints if all(ok(url) for url in health_urls(endpoints)) else None
            except httpx.HTTPError:
                return None

        endpoints = wait_for(
            "the stack to be up and answering", answering, timeout_s=START_S, interval_s=0.5
        )
        assert endpoints is not None
        return endpoints


def ok(url: str) -> bool:
    return httpx.get(url, timeout=2.0).status_code == 200


def health_urls(endpoints: Endpoints) -> list[str]:
    assert endpoints.prefect_api_url is not None
    urls = [
        f"{endpoints.prefect_api_url}/health",
        f"{endpoints.mlflow_uri}/health",
        *(f"{url}/health" for url in endpoints.provider_urls.values()),
    ]
    if endpoints.webhook_url is not None:
        urls.append(f"{endpoints.webhook_url}/health")
    return urls


def ports_of(urls: list[str]) -> set[int]:
    ports = {urlsplit(url).port for url in urls}
    return {port for port in ports if port is not None}


@contextlib.contextmanager
def running_up(tmp_path: Path, *args: str) -> Iterator[Up]:
    home = tmp_path / "home"
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*CLI, "up", "--home", str(home), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
            start_new_session=True,  # signals come from this test only, never from its terminal
        )
    up = Up(process, home, log, [])
    try:
        yield up
    finally:
        # A failed test leaves nothing behind either (the guardian would see to most of it).
        if process.poll() is None:
            up.seen.extend(descendants(process.pid))
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait(timeout=10)
        for proc in up.seen:
            if alive(proc):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)


def assert_all_gone(recorded: list[Proc], groups: set[int], sent: float) -> float:
    """Seconds from the signal until no recorded process and no member of the groups is left."""
    try:
        wait_for(
            "every process of the stack to end",
            lambda: not survivors(recorded, groups),
            timeout_s=STOP_S + GUARDIAN_GRACE_S,
        )
    except pytest.fail.Exception:
        left = survivors(recorded, groups)
        named = [f"{proc.pid} {command_of(proc.pid)}" for proc in left]
        pytest.fail(f"still running {time.monotonic() - sent:.1f} s after the signal: {named}")
    return time.monotonic() - sent


# ------------------------------------------------------------------ the signals


@pytest.mark.parametrize(
    ("signum", "args", "moment"),
    [
        # SIGTERM: the data-plane case below
        pytest.param(
            signal.SIGINT, ("--service", "my-assistant"), "waiting", id="SIGINT-waiting-champion"
        ),
        pytest.param(signal.SIGHUP, (), "starting", id="SIGHUP-starting"),
    ],
)
def test_a_stop_signal_ends_up_and_every_process_it_started(
    tmp_path: Path, signum: signal.Signals, args: tuple[str, ...], moment: str
) -> None:
    with running_up(tmp_path, *args) as up:
        if moment == "starting":
            # Servers forked, none answering yet (Prefect alone takes seconds): mid-start.
            wait_for("up to fork its servers", lambda: len(up.direct_children()) >= 3, START_S)
            endpoints = None
        else:
            endpoints = up.ready()
            if moment == "waiting":
                wait_for("up to wait for a champion", lambda: "once it has a champion" in up.output)
        recorded, groups = up.record()
        assert len(groups) >= 3, recorded
        if moment == "starting":
            assert not (up.home / STACK_FILE).exists(), "the stack was up before the signal"

        sent = time.monotonic()
        up.process.send_signal(signum)
        wait_for("up to exit", lambda: up.process.poll() is not None, STOP_S)
        exited = time.monotonic() - sent
        assert up.process.returncode == 128 + signum, up.output
        gone = assert_all_gone(recorded, groups, sent)
        print(f"\n{signum.name} while {moment}: up exited after {exited:.2f} s, "
              f"{len(recorded)} descendants gone after {gone:.2f} s")  # fmt: skip

        assert f"stopped by {signum.name}" in up.output
        assert not (up.home / STACK_FILE).exists()
        if endpoints is not None:
            ports = ports_of(health_urls(endpoints))
            wait_for("the stack's ports to be free", lambda: all(map(port_free, ports)), 10)


def test_up_killed_outright_takes_its_servers_and_their_workers_along(tmp_path: Path) -> None:
    """SIGKILL runs no handler: the guardian (`local/processes.py`) sees its pipe close and
    ends every group `up` started, the servers' own workers included."""
    with running_up(tmp_path) as up:
        endpoints = up.ready()
        recorded, groups = up.record()
        direct = [proc for proc in recorded if proc.ppid == up.process.pid]
        assert len(direct) >= 4, recorded  # Prefect, MLflow, sandbox, webhook, the guardian

        sent = time.monotonic()
        up.process.kill()
        up.process.wait(timeout=10)
        gone = assert_all_gone(recorded, groups, sent)
        print(f"\nSIGKILL: {len(recorded)} descendants gone after {gone:.2f} s")
        ports = ports_of(health_urls(endpoints))
        wait_for("the stack's ports to be free", lambda: all(map(port_free, ports)), 10)


def test_sigterm_with_the_data_plane_up_ends_envoy_prometheus_and_the_services(
    tmp_path: Path,
) -> None:
    """`up --service --users`: a champion published while it waits starts the data plane and
    the simulated users; a SIGTERM then ends the model services, Envoy and Prometheus too."""
    from canaryflow import connections
    from canaryflow.local import examples
    from canaryflow.registry.signing import generate_keypair, sign

    with running_up(tmp_path, "--service", examples.SERVICE, "--users", "20") as up:
        endpoints = up.ready()
        keys = generate_keypair(Path(endpoints.keys_dir), "ci", [examples.SERVICE])
        registry = connections.registry(endpoints.mlflow_uri)
        champion = registry.publish(
            sign(examples.manifest("1.1", "sandbox-base"), keys.private_path)
        )
        registry.promote(champion.service, champion.version)

        def dataplane() -> Endpoints | None:
            assert up.process.poll() is None, f"up exited early:\n{up.output}"
            now = load_endpoints(up.home)
            return now if now.envoy_url is not None and now.prometheus_url is not None else None

        live = wait_for("the data plane to start", dataplane, timeout_s=START_S, interval_s=0.5)
        assert live is not None and live.envoy_admin_url is not None
        urls = [live.envoy_admin_url, str(live.prometheus_url), *live.model_service_urls]
        recorded, groups = up.record()
        assert len(groups) >= 8, recorded  # 4 control plane, 2 services, Envoy, Prometheus (+1)

        def users_answered() -> bool:  # the users' requests reach the service through Envoy
            metrics = httpx.get(f"{live.model_service_admin_urls[0]}/metrics", timeout=5).text
            return 'role="stable"' in metrics and "canaryflow_requests_total{" in metrics

        wait_for("simulated users' requests", users_answered, timeout_s=30, interval_s=0.5)

        sent = time.monotonic()
        up.process.send_signal(signal.SIGTERM)
        wait_for("up to exit", lambda: up.process.poll() is not None, STOP_S)
        exited = time.monotonic() - sent
        assert up.process.returncode == 128 + signal.SIGTERM, up.output
        gone = assert_all_gone(recorded, groups, sent)
        print(f"\nSIGTERM with the data plane: up exited after {exited:.2f} s, "
              f"{len(recorded)} descendants gone after {gone:.2f} s")  # fmt: skip
        ports = ports_of([*health_urls(endpoints), str(live.envoy_url), *urls])
        wait_for("the stack's ports to be free", lambda: all(map(port_free, ports)), 10)


# ------------------------------------------------------------------ serve and sandbox options


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )


def test_serve_help_shows_the_options_of_the_model_service() -> None:
    shown = cli("serve", "--help")
    assert shown.returncode == 0, shown.stderr
    assert "usage: canaryflow serve" in shown.stdout
    for option in ("--service", "--port", "--registry-uri", "--keys-dir", "--tool-url", "--store"):
        assert option in shown.stdout


def test_serve_reports_its_own_errors() -> None:
    refused = cli("serve", "--port", "0", "--no-such-option")
    assert refused.returncode == 2
    assert "canaryflow serve: error" in refused.stderr


def test_sandbox_help_shows_its_options() -> None:
    shown = cli("sandbox", "--help")
    assert shown.returncode == 0, shown.stderr
    assert "usage: canaryflow sandbox" in shown.stdout
    for option in ("--host", "--port", "--log-level"):
        assert option in shown.stdout


def test_sandbox_starts_on_the_port_it_is_given(tmp_path: Path) -> None:
    port = free_port()
    with (tmp_path / "sandbox.log").open("wb") as out:
        process = subprocess.Popen(
            [*CLI, "sandbox", "--host", "127.0.0.1", "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
        )  # fmt: skip
    try:

        def health() -> bool:
            assert process.poll() is None, (tmp_path / "sandbox.log").read_text()
            try:
                return ok(f"http://127.0.0.1:{port}/health")
            except httpx.HTTPError:
                return False

        wait_for("the sandbox to answer /health", health, timeout_s=60)
        process.terminate()
        wait_for("the sandbox to exit", lambda: process.poll() is not None, STOP_S)
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait(timeout=10)


# ------------------------------------------------------------------ up --tool


def test_up_tool_endpoints_reach_both_model_services(tmp_path: Path) -> None:
    from canaryflow.app.cli import parse_args

    args = parse_args(
        ["up", "--service", "my-assistant", "--tool", "search=http://127.0.0.1:9/s",
         "--tool", "refund=https://tools.example/refund"]
    )  # fmt: skip
    assert args.tool == [
        ("search", "http://127.0.0.1:9/s"),
        ("refund", "https://tools.example/refund"),
    ]
    endpoints = Endpoints(
        home=str(tmp_path),
        mlflow_uri="http://127.0.0.1:1",
        provider_urls={"sandbox": "http://127.0.0.1:2"},
        keys_dir=str(tmp_path / "keys"),
        store_url=f"sqlite:///{tmp_path / 'store.db'}",
    )
    for name in ("primary", "shadow"):
        command = model_service(tmp_path, name, "my-assistant", endpoints, dict(args.tool)).command
        assert "--tool-url=search=http://127.0.0.1:9/s" in command
        assert "--tool-url=refund=https://tools.example/refund" in command


@pytest.mark.parametrize(
    "args",
    [
        ["up", "--service", "s", "--tool", "no-url"],
        ["up", "--service", "s", "--tool", "bad name=http://x"],
        ["up", "--service", "s", "--tool", "t=file:///etc/passwd"],
    ],
)
def test_up_refuses_a_malformed_tool(args: list[str]) -> None:
    from canaryflow.app.cli import parse_args

    with pytest.raises(SystemExit) as exited:
        parse_args(args)
    assert exited.value.code == 2


def test_up_refuses_a_tool_without_a_service_before_starting_anything(tmp_path: Path) -> None:
    refused = cli("--home", str(tmp_path), "up", "--tool", "search=http://127.0.0.1:9/s")
    assert refused.returncode == 2
    assert "--tool needs --service" in refused.stderr
    assert not (tmp_path / STACK_FILE).exists()
