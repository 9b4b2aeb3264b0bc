"""Rollbacks under faults, against a real Envoy: a stalled or dead admin, Envoy stopped and
restarted mid-rollback, writers in other processes, live traffic while the admin stalls.

What must hold whatever happens: a rollback never moves traffic toward the candidate. Its
stable-only routes are in the route file from the first write on (Envoy reloads that file by
itself, admin or not), nothing puts the canary routes back, and the rollback returns once
Envoy confirms them or raises `RollbackUnconfirmed` saying they are in place.

The upstream is `tests/integration/test_envoy.py` run as a script: an echo app that logs each
arrival (monotonic clock, shared by every process on the machine) with the role Envoy set.
Each test prints its figures (`FIGURE ...`); `pytest -s` shows them.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import random
import socket
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx
import pytest

from canaryflow.contracts import RouteChange, Routes
from canaryflow.dataplane.envoy_config import parse_route_mark, read_route_file
from canaryflow.dataplane.envoy_routes import EnvoyRoutes
from canaryflow.errors import RollbackUnconfirmed, RoutesChanged, StackError
from canaryflow.local.envoy import EnvoyProxy
from canaryflow.local.processes import ManagedProcess, free_port, http_ok
from tests.waiting import wait_for

SERVICE = "chat"
REPO = Path(__file__).resolve().parents[2]
ECHO = REPO / "tests" / "integration" / "test_envoy.py"  # doubles as the echo upstream
STABLE = Routes(service=SERVICE, stable="1")


def figure(text: str) -> None:
    print(f"FIGURE {text}")


# ---- a stallable TCP proxy in front of Envoy's admin -----------------------------------------


class AdminGate:
    """TCP proxy to the admin port. `stall()`: connections are accepted and bytes held, in both
    directions, until `resume()`: an admin that is slow, not down."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._open = threading.Event()
        self._open.set()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def stall(self) -> None:
        self._open.clear()

    def resume(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self._open.set()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
        except OSError:
            client.close()
            return
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(None)
        threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()
        self._pipe(client, upstream)

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                while not self._open.wait(0.05):
                    if self._closed:
                        return
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


# ---- the data plane: one echo upstream, Envoys in front of it --------------------------------


class Echo:
    def __init__(self, home: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = ManagedProcess(
            name="echo upstream",
            command=[sys.executable, str(ECHO), str(self.port)],
            log_path=home / "echo.log",
            ready=http_ok(f"{self.url}/_health"),
            env={"PYTHONPATH": str(REPO)},
            cwd=REPO,
        )

    def records(self) -> list[dict[str, Any]]:
        """Arrivals since the last call: {"t": monotonic time, "headers": {...}}."""
        return list(httpx.get(f"{self.url}/_records", params={"clear": "1"}).json())


@pytest.fixture(scope="module")
def echo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Echo]:
    upstream = Echo(tmp_path_factory.mktemp("echo"))
    upstream.process.start(timeout_s=30)
    try:
        yield upstream
    finally:
        upstream.process.stop()


def make_proxy(home: Path, echo: Echo) -> EnvoyProxy:
    address = ("127.0.0.1", echo.port)
    return EnvoyProxy(
        home,
        service=SERVICE,
        listen_port=free_port(),
        admin_port=free_port(),
        upstreams={"stable": address, "canary": address, "shadow": address},
        initial_stable="1",
    )


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, echo: Echo) -> Iterator[EnvoyProxy]:
    envoy = make_proxy(tmp_path_factory.mktemp("envoy"), echo)
    envoy.start()
    try:
        yield envoy
    finally:
        envoy.stop()


@pytest.fixture
def gate(proxy: EnvoyProxy) -> Iterator[AdminGate]:
    admin = AdminGate(proxy.admin_port)
    try:
        yield admin
    finally:
        admin.close()


def controller_for(proxy: EnvoyProxy, admin_url: str | None = None, **kw: float) -> EnvoyRoutes:
    return EnvoyRoutes(proxy.home, admin_url or proxy.admin_url, service=SERVICE, **kw)


def canary(weight: float) -> Routes:
    return Routes(service=SERVICE, stable="1", canary="2", weight=weight)


def live_version(proxy: EnvoyProxy) -> int:
    """What Envoy serves, from its real admin."""
    stats = proxy.stats(r"^http\.ingress\.rds\.canaryflow\.version_text$")
    return int(next(iter(stats.values())))


def file_version(proxy: EnvoyProxy) -> int:
    return read_route_file(proxy.route_path)[0]


def roles(proxy: EnvoyProxy, n: int) -> Counter[str]:
    seen: Counter[str] = Counter()
    with httpx.Client(base_url=proxy.url, timeout=5.0) as client:
        for _ in range(n):
            response = client.get("/v1/models")
            response.raise_for_status()
            seen[response.json()["headers"]["x-canaryflow-role"]] += 1
    return seen


class Stream:
    """Requests through Envoy, back to back, from a thread, until stopped."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.errors = 0
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Stream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=5.0) as client:
            while not self._stop.is_set():
                try:
                    self.errors += client.get("/v1/models").status_code != 200
                except httpx.HTTPError:
                    self.errors += 1
                self.sent += 1


def in_thread(call: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run `call` in a thread; the dict gets "result" or "error", and "returned" (monotonic)."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = call()
        except BaseException as exc:
            out["error"] = exc
        out["returned"] = time.monotonic()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def when_stable_in_file(proxy: EnvoyProxy, timeout_s: float = 5.0) -> float:
    """Monotonic time at which the route file was first seen stable-only (1 ms polls)."""

    def stable() -> float | None:
        text = proxy.route_path.read_text()
        return time.monotonic() if parse_route_mark(text).routes == STABLE else None

    return wait_for("stable-only routes in the file", stable, timeout_s, 0.001)


# ---- admin slow, admin dead ------------------------------------------------------------------


def test_rollback_with_a_stalled_admin_is_confirmed_when_the_admin_answers_again(
    proxy: EnvoyProxy, gate: AdminGate, echo: Echo
) -> None:
    controller = controller_for(proxy, gate.url, confirm_timeout_s=0.5, admin_timeout_s=0.5)
    controller.set_routes(canary(50))
    start_version = file_version(proxy)
    echo.records()
    with Stream(proxy.url) as stream:
        time.sleep(0.2)
        gate.stall()
        called = time.monotonic()
        thread, out = in_thread(controller.rollback)
        written = when_stable_in_file(proxy)
        time.sleep(3.0)  # the admin stays silent 3 s
        assert thread.is_alive(), out  # still confirming: no error, nothing put back
        assert read_route_file(proxy.route_path)[1] == STABLE
        resumed = time.monotonic()
        gate.resume()
        thread.join(15)
        time.sleep(0.1)
    assert out.get("result") == RouteChange(canary(50), STABLE), out
    arrivals = echo.records()
    last_canary = max(
        (a["t"] for a in arrivals if a["headers"]["x-canaryflow-role"] == "canary"), default=0
    )
    version = file_version(proxy)
    assert version > start_version + 1  # re-written with new versions while unconfirmed
    assert live_version(proxy) == version
    assert read_route_file(proxy.route_path)[1] == STABLE
    assert stream.errors == 0
    assert roles(proxy, 20) == Counter(stable=20)
    figure(
        f"stalled admin: file stable-only {1e3 * (written - called):.1f} ms after the call; "
        f"last canary request {1e3 * (last_canary - called):.1f} ms after the call; "
        f"rollback confirmed {1e3 * (out['returned'] - resumed):.0f} ms after the admin "
        f"answered again ({out['returned'] - called:.2f} s in all, "
        f"{version - start_version} writes); {stream.sent} requests, 0 errors"
    )


def test_rollback_with_a_dead_admin_raises_saying_stable_routes_are_in_place(
    proxy: EnvoyProxy, echo: Echo
) -> None:
    controller_for(proxy).set_routes(canary(50))
    dead = f"http://127.0.0.1:{free_port()}"
    controller = controller_for(proxy, dead, rollback_timeout_s=1.5, confirm_timeout_s=0.5)
    called = time.monotonic()
    with pytest.raises(RollbackUnconfirmed) as raised:
        controller.rollback()
    took = time.monotonic() - called
    message = str(raised.value)
    assert "ARE in the route file" in message and "nothing was put back" in message
    assert "version_text" in message and dead in message
    assert raised.value.change == RouteChange(canary(50), STABLE)
    # The file is the truth Envoy reloads by itself: it serves stable already.
    assert read_route_file(proxy.route_path)[1] == STABLE
    assert live_version(proxy) == file_version(proxy) == raised.value.version
    assert roles(proxy, 20) == Counter(stable=20)
    # The admin back: the next rollback is confirmed at once.
    again = controller_for(proxy).rollback()
    assert again.after == STABLE
    figure(f"dead admin: RollbackUnconfirmed after {took:.2f} s (deadline 1.5 s); Envoy live")


def test_retreat_with_a_stalled_admin_is_not_undone_but_a_forward_move_writes_nothing(
    proxy: EnvoyProxy, gate: AdminGate
) -> None:
    controller_for(proxy).set_routes(canary(25))
    slow = controller_for(
        proxy, gate.url, rollback_timeout_s=1.0, confirm_timeout_s=0.3, admin_timeout_s=0.3
    )
    gate.stall()
    before = file_version(proxy)
    with pytest.raises(StackError, match="did not answer"):
        slow.set_routes(canary(50))  # forward: needs the admin before it writes
    assert (file_version(proxy), read_route_file(proxy.route_path)[1]) == (before, canary(25))
    with pytest.raises(RollbackUnconfirmed, match="ARE in the route file"):
        slow.set_routes(canary(5))  # less canary: never put back
    assert read_route_file(proxy.route_path)[1] == canary(5)
    with pytest.raises(RollbackUnconfirmed):
        slow.set_routes(Routes(service=SERVICE, stable="0"))  # on-call's "all to v0"
    assert read_route_file(proxy.route_path)[1] == Routes(service=SERVICE, stable="0")
    gate.resume()
    wait_for("Envoy on the file's version", lambda: live_version(proxy) == file_version(proxy))
    controller_for(proxy).set_routes(STABLE)


# ---- Envoy stopped during a rollback ---------------------------------------------------------


def test_envoy_stopped_during_a_rollback_boots_on_the_stable_routes(
    tmp_path: Path, echo: Echo
) -> None:
    envoy = make_proxy(tmp_path, echo)
    envoy.start()
    try:
        controller = controller_for(envoy, confirm_timeout_s=0.5)
        controller.set_routes(canary(25))
        envoy.stop()
        # A short deadline: the rollback gives up while Envoy is down, routes written.
        short = controller_for(envoy, rollback_timeout_s=1.0, confirm_timeout_s=0.3)
        with pytest.raises(RollbackUnconfirmed, match="boots on it"):
            short.rollback()
        assert read_route_file(envoy.route_path)[1] == STABLE
        # Canary again (a new release: the old controller is refused, it missed the rollback),
        # Envoy down again; this time the rollback outlives the outage.
        envoy.start()
        with pytest.raises(RoutesChanged, match="a rollback wins"):
            controller.set_routes(canary(25))
        controller = controller_for(envoy, confirm_timeout_s=0.5)
        controller.set_routes(canary(25))
        envoy.stop()
        called = time.monotonic()
        thread, out = in_thread(controller.rollback)
        written = when_stable_in_file(envoy)
        time.sleep(1.0)
        assert thread.is_alive(), out
        restarted = time.monotonic()
        envoy.start()
        booted = time.monotonic()
        thread.join(30)
        assert out.get("result") == RouteChange(canary(25), STABLE), out
        assert roles(envoy, 20) == Counter(stable=20)
        assert live_version(envoy) == file_version(envoy)
        # (The dump keeps the version that first carried this content: Envoy skips a reload
        # whose routes are unchanged, and the rollback's re-writes are all the same routes.)
        dump = httpx.get(f"{envoy.admin_url}/config_dump?resource=dynamic_route_configs").json()
        [host] = dump["configs"][0]["route_config"]["virtual_hosts"]
        clusters = host["routes"][-1]["route"]["weighted_clusters"]["clusters"]  # after feedback
        assert [c["name"] for c in clusters] == ["stable"]
        figure(
            f"Envoy down during rollback: file stable-only {1e3 * (written - called):.1f} ms "
            f"after the call; Envoy (re)start took {booted - restarted:.2f} s and booted on "
            f"stable-only; rollback confirmed {1e3 * (out['returned'] - restarted):.0f} ms after "
            f"the restart began ({out['returned'] - called:.2f} s in all)"
        )
    finally:
        envoy.stop()


# ---- live traffic while the admin stalls -----------------------------------------------------


def test_canary_stops_getting_requests_once_the_file_is_written_admin_or_not(
    proxy: EnvoyProxy, gate: AdminGate, echo: Echo
) -> None:
    controller_for(proxy).set_routes(canary(50))
    slow = controller_for(
        proxy, gate.url, rollback_timeout_s=1.5, confirm_timeout_s=0.5, admin_timeout_s=0.5
    )
    echo.records()
    with Stream(proxy.url) as stream:
        time.sleep(0.3)
        gate.stall()
        called = time.monotonic()
        thread, out = in_thread(slow.rollback)
        written = when_stable_in_file(proxy)
        thread.join(10)
        time.sleep(0.1)
    gate.resume()
    assert isinstance(out.get("error"), RollbackUnconfirmed), out
    arrivals = echo.records()
    canary_times = [a["t"] for a in arrivals if a["headers"]["x-canaryflow-role"] == "canary"]
    before = sum(t < called for t in canary_times)
    after_write = [t - written for t in canary_times if t > written]
    stable_after = sum(
        a["t"] > written and a["headers"]["x-canaryflow-role"] == "stable" for a in arrivals
    )
    assert before > 0  # the canary had traffic before
    assert stable_after > 100  # the stream kept going on stable while the admin was silent
    assert len(after_write) <= 5, after_write  # in flight at the rename, at most
    assert all(t < 0.25 for t in after_write), after_write
    assert stream.errors == 0
    figure(
        f"live stream, admin stalled: {len(after_write)} request(s) reached the canary after "
        f"the file was written (last {1e3 * max(after_write, default=0):.1f} ms after it); "
        f"{stable_after} reached stable meanwhile; {before} canary requests before the call; "
        f"file written {1e3 * (written - called):.1f} ms after the call"
    )
    controller_for(proxy).rollback()


# ---- writers in other processes --------------------------------------------------------------


def _step_loop(home: str, admin_url: str, conn: Connection) -> None:
    """A release's canary steps, as fast as they go, in a process of its own: one round per
    message, a fresh controller each round (a new release); stops when a step is refused."""
    while True:
        message = conn.recv()
        if message == "exit":
            return
        steps, canary_version = message
        controller = EnvoyRoutes(home, admin_url, service=SERVICE)
        versions: list[int] = []
        outcome = "done"
        for i in range(steps):
            weight = (5.0, 10.0, 25.0, 50.0)[i % 4]
            routes = Routes(service=SERVICE, stable="1", canary=canary_version, weight=weight)
            try:
                controller.set_routes(routes)
            except RoutesChanged:
                outcome = "refused"
                break
            except StackError as exc:
                outcome = f"error: {exc}"
                break
            assert controller.last_version is not None
            versions.append(controller.last_version)
            if i == 0:
                conn.send("started")
        conn.send({"versions": versions, "outcome": outcome, "at": time.monotonic()})
        controller.close()


def _rollbacks(home: str, admin_url: str, conn: Connection) -> None:
    """On-call's `canaryflow rollback` in a process of its own: one rollback per message."""
    while True:
        if conn.recv() == "exit":
            return
        controller = EnvoyRoutes(home, admin_url, service=SERVICE)
        called = time.monotonic()
        try:
            change = controller.rollback()
            conn.send({"took": time.monotonic() - called, "version": controller.last_version,
                       "after": change.after.model_dump_json(), "called": called})  # fmt: skip
        except Exception as exc:
            conn.send({"error": repr(exc)})
        controller.close()


class VersionWatch:
    """The versions the route file shows, read each time a rename gives it a new inode (polled
    every 0.5 ms: a subsequence of all versions, in the order they were visible)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seen: list[int] = []
        self.unreadable = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> VersionWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        inode = -1
        while not self._stop.is_set():
            try:
                with self.path.open() as handle:  # the inode and the text of one file
                    current = os.fstat(handle.fileno()).st_ino
                    if current != inode:
                        inode = current
                        self.seen.append(parse_route_mark(handle.read()).version)
            except (OSError, StackError):
                self.unreadable += 1
            time.sleep(0.0005)


@pytest.fixture(scope="module")
def workers() -> Iterator[Callable[..., tuple[Any, Connection]]]:
    """Spawned processes (no fork: nothing of pytest's process carries over)."""
    context = multiprocessing.get_context("spawn")
    started: list[tuple[Any, Connection]] = []

    def start(target: Callable[..., None], *args: str) -> tuple[Any, Connection]:
        ours, theirs = context.Pipe()
        process = context.Process(target=target, args=(*args, theirs), daemon=True)
        process.start()
        started.append((process, ours))
        return process, ours

    try:
        yield start
    finally:
        for process, conn in started:
            with contextlib.suppress(OSError):
                conn.send("exit")
            process.join(10)
            if process.is_alive():
                process.terminate()


def test_rollback_racing_canary_steps_in_another_process_ends_on_stable(
    proxy: EnvoyProxy, workers: Callable[..., tuple[Any, Connection]]
) -> None:
    home, admin = str(proxy.home), proxy.admin_url
    _, steps = workers(_step_loop, home, admin)
    _, rollbacks = workers(_rollbacks, home, admin)
    rounds = 12
    took: list[float] = []
    refused_after: list[float] = []
    steps_before: list[int] = []
    rng = random.Random(7)
    with VersionWatch(proxy.route_path) as watch:
        for _ in range(rounds):
            steps.send((5000, "2"))
            assert steps.poll(30) and steps.recv() == "started"
            time.sleep(rng.uniform(0.01, 0.08))
            rollbacks.send("go")
            assert rollbacks.poll(60)
            rolled = rollbacks.recv()
            assert "error" not in rolled, rolled
            assert steps.poll(60)
            stepped = steps.recv()
            # The step after the rollback is refused; nothing the loop wrote comes after it.
            assert stepped["outcome"] == "refused", stepped
            versions = stepped["versions"]
            assert versions == sorted(set(versions))
            assert all(v < rolled["version"] for v in versions), (versions, rolled)
            assert Routes.model_validate_json(rolled["after"]) == STABLE
            assert read_route_file(proxy.route_path) == (rolled["version"], STABLE)
            assert live_version(proxy) == rolled["version"]
            took.append(rolled["took"] * 1e3)
            refused_after.append((stepped["at"] - rolled["called"]) * 1e3)
            steps_before.append(len(versions))
    assert watch.seen == sorted(watch.seen), watch.seen  # the file's version never goes back
    assert watch.unreadable == 0
    assert roles(proxy, 20) == Counter(stable=20)
    figure(
        f"rollback vs canary steps in another process, {rounds} rounds: rollback() call "
        f"(to confirmed stable) median {statistics.median(took):.1f} ms, max {max(took):.1f} ms; "
        f"the step loop refused {statistics.median(refused_after):.1f} ms (median) after the "
        f"call; {statistics.median(steps_before):.0f} steps a round before it (median); "
        f"{len(watch.seen)} file versions observed, all increasing"
    )


def test_two_processes_writing_end_with_the_last_writers_routes_live(
    proxy: EnvoyProxy, workers: Callable[..., tuple[Any, Connection]]
) -> None:
    home, admin = str(proxy.home), proxy.admin_url
    loops = [workers(_step_loop, home, admin)[1] for _ in range(2)]
    with VersionWatch(proxy.route_path) as watch:
        for conn, version in zip(loops, ("3", "4"), strict=True):
            conn.send((60, version))
        results = []
        for conn in loops:
            assert conn.poll(60) and conn.recv() == "started"
        for conn in loops:
            assert conn.poll(60)
            results.append(conn.recv())
    assert [r["outcome"] for r in results] == ["done", "done"], results
    a, b = (r["versions"] for r in results)
    assert len(a) == len(b) == 60 and not set(a) & set(b)  # one writer at a time
    assert a == sorted(a) and b == sorted(b)
    last = max(a + b)
    winner = "3" if last in a else "4"
    version, routes = read_route_file(proxy.route_path)
    assert version == last and routes is not None and routes.canary == winner
    assert live_version(proxy) == last
    assert watch.seen == sorted(watch.seen) and watch.unreadable == 0
    order = sorted(a + b)
    interleaved = sum((x in a) != (y in a) for x, y in itertools.pairwise(order))
    figure(
        f"two forward writers, 60 writes each: versions unique and increasing, "
        f"{interleaved} hand-overs between the processes; last writer's routes live"
    )
    controller_for(proxy).rollback()


# ---- the silence automation's rollback with the registry down --------------------------------


def test_silence_rollback_moves_traffic_before_asking_the_registry_which_is_down(
    proxy: EnvoyProxy, prefect_api: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The automation's `rollback(to_alias="champion")` takes the canary off from the routes
    file alone: with MLflow unreachable the flow fails at the registry step, after traffic is
    on the release's stable."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from canaryflow.contracts import Endpoints
    from canaryflow.settings import pinned_endpoints
    from flows.rollback import rollback

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # only the task's own retries
    controller_for(proxy).set_routes(canary(25))
    endpoints = Endpoints(
        home=str(tmp_path),
        mlflow_uri=f"http://127.0.0.1:{free_port()}",  # nothing listens: the registry is down
        prefect_api_url=prefect_api,
        keys_dir=str(tmp_path / "keys"),
        envoy_url=proxy.url,
        envoy_admin_url=proxy.admin_url,
        envoy_home=str(proxy.home),
    )

    def silence_rollback() -> object:
        with (
            temporary_settings(updates={PREFECT_API_URL: prefect_api}),
            pinned_endpoints(endpoints),
        ):
            return rollback(service=SERVICE, to_alias="champion", reason="silent canary: test")

    called = time.monotonic()
    thread, out = in_thread(silence_rollback)
    written = when_stable_in_file(proxy, timeout_s=30)
    thread.join(120)
    assert "error" in out, "the registry step cannot succeed with MLflow down"
    assert read_route_file(proxy.route_path)[1] == STABLE
    assert roles(proxy, 20) == Counter(stable=20)
    figure(
        f"silence rollback, MLflow down: stable-only routes {written - called:.2f} s after the "
        f"flow started; flow failed at the registry after {out['returned'] - called:.1f} s"
    )
