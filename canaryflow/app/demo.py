"""`canaryflow demo` and `canaryflow up`: the embedded stack with real releases on it.

The demo publishes a champion, then runs four releases of the Gemini-docs adapter through the
real DAG: a good candidate (promoted after shadow and canary), a candidate that hallucinates
(rejected at the offline gate), a slower one that passes offline but is caught in a canary window,
and one that hallucinates only on topics the suites miss (caught in shadow). It ends with a
summary and stops everything it started.

Both commands stop every process they started on SIGTERM, SIGINT (Ctrl-C) or SIGHUP, whatever
they are doing, and exit with 128 + the signal's number (`StopSignals`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from rich.table import Table

from canaryflow import connections
from canaryflow.app.prefect_session import prefect_session
from canaryflow.app.summaries import console, headline, print_progress, print_record
from canaryflow.contracts import Endpoints, ReleaseRecord, SignedManifest
from canaryflow.loading import load_policy
from canaryflow.local import examples
from canaryflow.local.stack import EmbeddedStack

POLICY = Path(__file__).resolve().parents[2] / "deployments" / "policies" / "default.yaml"


@dataclass(frozen=True)
class Scenario:
    title: str
    version: str
    provider_model: str
    expect: str
    shadow: bool = True


SCENARIOS = (
    Scenario("1. a better adapter: shadow, canary, promote", "1.2", "sandbox-good", "promoted"),
    Scenario(
        "2. an adapter that hallucinates: stopped at the offline gate",
        "1.3",
        "sandbox-hallucinating",
        "rejected",
    ),
    Scenario(
        "3. a slower adapter, shipped straight to canary: caught live, rolled back",
        "1.4",
        "sandbox-slow",
        "rolled_back",
        shadow=False,
    ),
    Scenario(
        "4. an adapter that hallucinates on topics the suites miss: caught in shadow",
        "1.5",
        "sandbox-live-hallucinating",
        "rolled_back",
    ),
)


def _bootstrap_champion(endpoints: Endpoints) -> tuple[str, Path]:
    """Keys for CI, and v1 (the current production adapter) as the champion."""
    from canaryflow.registry.signing import generate_keypair, sign

    keys = generate_keypair(Path(endpoints.keys_dir), "ci", [examples.SERVICE])
    signed = sign(examples.manifest("1.1", "sandbox-base"), keys.private_path)
    registry = connections.registry(endpoints.mlflow_uri)
    published = registry.publish(signed)
    registry.promote(published.service, published.version)
    return published.version, keys.private_path


def _sign(scenario: Scenario, key: Path) -> SignedManifest:
    from canaryflow.registry.signing import sign

    return sign(examples.manifest(scenario.version, scenario.provider_model), key)


def _summary(results: list[tuple[Scenario, ReleaseRecord, float]]) -> Table:
    table = Table(title="canaryflow demo: summary", title_justify="left")
    for column in ("release", "candidate", "decision", "why", "breach → stable", "seconds"):
        table.add_column(column, overflow="fold")
    for scenario, record, seconds in results:
        ok = record.decision == scenario.expect
        decision = f"[{'green' if ok else 'red'}]{record.decision}[/]"
        breach = record.breach_to_stable_ms
        table.add_row(
            scenario.title.split(":")[0],
            f"v{scenario.version} ({scenario.provider_model})",
            decision,
            headline(record.reason),
            "—" if breach is None else f"{breach:.0f} ms",
            f"{seconds:.1f}",
        )
    return table


def _say(line: str) -> None:
    console.print(f"  {line}")


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """What the first stop signal raises in the main thread."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """SIGTERM, SIGINT and SIGHUP end the command, whatever its main thread is doing.

    The first one raises `Interrupted` in the main thread, so the stack's `with` stops every
    child; later ones are only noted, so the stopping itself is never cut short. `cancelled`
    only reads an attribute: the stack's worker threads poll it to give up a start. On leaving,
    an exception that followed a signal is swallowed (the caller returns `exit_code()`) and the
    previous handlers come back. A SIGHUP ignored when the command started (`nohup`) stays
    ignored; SIGINT is handled even when ignored at start (a script's background job), since
    `kill -INT` from a script is a way to ask for a stop. Only the main thread can install
    handlers: elsewhere this does nothing.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {}

    def cancelled(self) -> bool:
        return self.received is not None

    def exit_code(self) -> int:
        return 0 if self.received is None else 128 + self.received

    def name(self) -> str:
        return "" if self.received is None else signal.Signals(self.received).name

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
            raise Interrupted(signum)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self
        for signum in STOP_SIGNALS:
            if signum == signal.SIGHUP and signal.getsignal(signum) == signal.SIG_IGN:
                continue
            self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        for signum, handler in self._previous.items():
            # None: a handler not set from Python; the default is the closest to it.
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()
        return self.received is not None and exc is not None

    def report(self) -> None:
        """One line once the stack is down; a closed terminal (SIGHUP) is no error."""
        with contextlib.suppress(OSError, ValueError):
            console.print(f"stopped by {self.name()}: every process of the stack has ended")


def run_demo(home: Path, quick: bool = False) -> int:
    with StopSignals() as signals:
        code = _run_demo(home, quick, signals)
    if signals.received is not None:
        signals.report()
        # Every child is down. Left to itself, the interpreter would now run Prefect's exit
        # hook, which drains the crashed runs' events and logs to the Prefect server just
        # stopped, and waits on it without end: end at once, as the signal would have.
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(signals.exit_code())
    return code


def _run_demo(home: Path, quick: bool, signals: StopSignals) -> int:
    shutil.rmtree(home, ignore_errors=True)
    started = time.perf_counter()
    console.rule("[bold]canaryflow demo")
    results: list[tuple[Scenario, ReleaseRecord, float]] = []
    # The sandbox answers in ~40-70 ms; a short provider timeout keeps the wait for the last
    # window's late finishers (one timeout) short.
    stack = EmbeddedStack(home, progress=_say, cancelled=signals.cancelled, request_timeout_s=5.0)
    with stack:
        assert stack.endpoints is not None
        champion, key = _bootstrap_champion(stack.endpoints)
        console.print(f"  champion {examples.SERVICE} v{champion} published and signed")
        endpoints = stack.start_dataplane(examples.SERVICE, champion)
        from canaryflow.settings import pinned_endpoints
        from flows.release import release

        policy = load_policy(POLICY)
        log_file = home / "logs" / "flows.log"
        console.print(f"  Prefect's per-task log: {log_file}")
        # Production has users; the embedded stack has these, for the whole demo: the releases
        # judge their requests, and start or stop none of them.
        console.print(f"  {examples.USER_RATE_RPS:g} simulated users' requests per second to Envoy")
        with (
            pinned_endpoints(endpoints),
            prefect_session(endpoints.prefect_api_url, log_file, print_progress),
            examples.simulated_users(endpoints) as users,
        ):
            for scenario in SCENARIOS:
                console.rule(scenario.title)
                spec = examples.demo_spec(
                    _sign(scenario, key), policy, window_s=3.0 if quick else 4.0,
                    shadow=scenario.shadow,
                )  # fmt: skip
                began = time.perf_counter()
                record = release(spec=spec)
                results.append((scenario, record, time.perf_counter() - began))
                print_record(record)
            served = users.stop()
        console.print(
            f"  simulated users: {served.sent} requests, {served.ok} answered, "
            f"p95 {served.latency_p95_ms or 0:.1f} ms"
        )
        console.rule("summary")
        console.print(_summary(results))
        prefect_ui = str(endpoints.prefect_api_url).removesuffix("/api")
        console.print(
            f"Prefect UI {prefect_ui} (flow runs, artifacts, events) · MLflow "
            f"{endpoints.mlflow_uri} (models/{examples.SERVICE}, experiment canaryflow-releases)"
        )
    console.print(
        f"demo finished in {time.perf_counter() - started:.0f} s; every process stopped. "
        f"Browse its runs: canaryflow --home {home} up"
    )
    return 0 if all(r.decision == s.expect for s, r, _ in results) else 1


def keep_stack_up(
    home: Path,
    service: str | None = None,
    tool_urls: Mapping[str, str] | None = None,
    *,
    max_request_bytes: int | None = None,
    users_rps: float | None = None,
    providers_file: Path | None = None,
    checkers_policy: Path | None = None,
) -> int:
    """`canaryflow up`: the same stack, running until Ctrl-C, for the Prefect and MLflow UIs.

    With `--service`, the data plane starts as soon as the service has a champion: at once if it
    has one, else when `canaryflow publish ... --champion` makes one. `tool_urls` (tool name ->
    URL) go to its model services; `users_rps` starts simulated users once it runs.
    `max_request_bytes`: the body cap of Envoy and the model services (None: 1 MiB). SIGTERM,
    SIGINT or SIGHUP, while starting, waiting for a champion or idle, stop every process and
    return 128 + the signal's number.
    """
    with StopSignals() as signals:
        stack = EmbeddedStack(
            home,
            progress=_say,
            cancelled=signals.cancelled,
            max_request_bytes=max_request_bytes,
            providers_file=providers_file,
            checkers_policy=checkers_policy,
        )
        _keep_stack_up(stack, service, tool_urls or {}, users_rps, signals)
    if signals.received is not None:
        signals.report()
    return signals.exit_code()


def _keep_stack_up(
    stack: EmbeddedStack,
    service: str | None,
    tool_urls: Mapping[str, str],
    users_rps: float | None,
    signals: StopSignals,
) -> None:
    with stack, contextlib.ExitStack() as users:
        assert stack.endpoints is not None
        endpoints = stack.endpoints
        console.print(f"Prefect UI  {str(endpoints.prefect_api_url).removesuffix('/api')}")
        console.print(f"MLflow UI   {endpoints.mlflow_uri}")
        console.print("Ctrl-C (or SIGTERM, SIGHUP) stops everything.")
        waiting = service is not None
        if waiting:
            console.print(f"  the data plane of {service} starts once it has a champion")
        # The first signal raises out of any of these waits; the check covers a library that
        # caught that exception on its way out.
        while not signals.cancelled():
            if waiting and service is not None:
                waiting = not _start_dataplane_if_ready(stack, service, tool_urls)
                if not waiting and users_rps is not None:
                    users.enter_context(examples.simulated_users(stack.endpoints, users_rps))
                    console.print(f"  simulated users: {users_rps:g} requests/s through Envoy")
            if waiting:
                time.sleep(2.0)
            elif not signals.cancelled():
                signal.pause()


def _start_dataplane_if_ready(
    stack: EmbeddedStack, service: str, tool_urls: Mapping[str, str]
) -> bool:
    from canaryflow.errors import AliasNotFound

    assert stack.endpoints is not None
    try:
        champion = connections.registry(stack.endpoints.mlflow_uri).resolve(service, "champion")
    except AliasNotFound:
        return False
    endpoints = stack.start_dataplane(service, champion.version, tool_urls=tool_urls)
    console.print(f"Envoy       {endpoints.envoy_url}  (OpenAI requests for {service} go here)")
    return True
