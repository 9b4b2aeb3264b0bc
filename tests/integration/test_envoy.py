"""Real Envoy in front of real HTTP upstreams: split, headers, mirror, verification, rollback.

The upstreams are this file run as a script: a tiny aiohttp app that echoes the headers it got
and keeps an arrival log (monotonic time + headers) that the tests read back directly. Routes
are driven the way the release steps drive them: an `EnvoyRoutes` built from the Envoy's home
folder and admin URL, never from the `EnvoyProxy` that runs the process.
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import os
import socket
import struct
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from scipy.stats import binomtest

from canaryflow.contracts import Endpoints, RouteChange, Routes
from canaryflow.dataplane.controller import TrafficController, is_retreat
from canaryflow.dataplane.envoy_config import read_route_file
from canaryflow.dataplane.envoy_routes import EnvoyRoutes
from canaryflow.errors import ConfigError, RoutesBusy, RoutesChanged, StackError
from canaryflow.local.envoy import EnvoyProxy
from canaryflow.local.processes import ManagedProcess, free_port, http_ok
from tests.waiting import wait_for

SERVICE = "chat"
REPO = Path(__file__).resolve().parents[2]


class Upstream:
    """Handle on an echo upstream process: its URL and its arrival log."""

    def __init__(self, process: ManagedProcess, port: int) -> None:
        self.process = process
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    def records(self, clear: bool = True) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/_records", params={"clear": "1" if clear else ""})
        return list(response.json())


def start_upstream(home: Path, name: str, delay_s: float = 0.0) -> Upstream:
    port = free_port()
    process = ManagedProcess(
        name=f"echo upstream {name}",
        command=[sys.executable, str(Path(__file__).resolve()), str(port), str(delay_s)],
        log_path=home / f"{name}.log",
        ready=http_ok(f"http://127.0.0.1:{port}/_health"),
        env={"PYTHONPATH": str(REPO)},
        cwd=REPO,
    )
    process.start(timeout_s=30)
    return Upstream(process, port)


@pytest.fixture(scope="module")
def upstreams(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Upstream]]:
    home = tmp_path_factory.mktemp("upstreams")
    delays = {"primary": 0.0, "shadow": 0.5}
    with ThreadPoolExecutor(len(delays)) as pool:  # each start pays a Python import
        futures = {name: pool.submit(start_upstream, home, name, d) for name, d in delays.items()}
    started = {name: f.result() for name, f in futures.items() if f.exception() is None}
    try:
        for future in futures.values():
            future.result()  # re-raises a failed start, after the others are kept for cleanup
        yield started
    finally:
        for upstream in started.values():
            upstream.process.stop()


def make_proxy(home: Path, upstreams: dict[str, Upstream], initial: str | None) -> EnvoyProxy:
    primary = ("127.0.0.1", upstreams["primary"].port)
    return EnvoyProxy(
        home,
        service=SERVICE,
        listen_port=free_port(),
        admin_port=free_port(),
        upstreams={
            "stable": primary,
            "canary": primary,
            "shadow": ("127.0.0.1", upstreams["shadow"].port),
        },
        initial_stable=initial,
        synthetic_port=free_port(),
    )


@pytest.fixture(scope="module")
def proxy(
    tmp_path_factory: pytest.TempPathFactory, upstreams: dict[str, Upstream]
) -> Iterator[EnvoyProxy]:
    envoy = make_proxy(tmp_path_factory.mktemp("envoy"), upstreams, initial="1")
    envoy.start()
    try:
        yield envoy
    finally:
        envoy.stop()


@pytest.fixture(scope="module")
def controller(proxy: EnvoyProxy) -> Iterator[EnvoyRoutes]:
    """Built from the home folder and admin URL only, as `connections.traffic_controller` does."""
    routes = EnvoyRoutes(proxy.home, proxy.admin_url, service=SERVICE)
    yield routes
    routes.close()


def endpoints_of(proxy: EnvoyProxy) -> Endpoints:
    """What a release step is given: where the Envoy lives, no handle on its process."""
    home = str(proxy.home)
    return Endpoints(
        home=home,
        mlflow_uri="unused",
        keys_dir="unused",
        envoy_home=home,
        envoy_admin_url=proxy.admin_url,
    )


@pytest.fixture(scope="module")
def client(proxy: EnvoyProxy) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=proxy.url, timeout=5.0) as http:
        yield http


@pytest.fixture(autouse=True)
def clean_logs(request: pytest.FixtureRequest) -> None:
    if "upstreams" in request.fixturenames:
        ups: dict[str, Upstream] = request.getfixturevalue("upstreams")
        for upstream in ups.values():
            upstream.records()


def roles(client: httpx.Client, n: int, headers: dict[str, str] | None = None) -> Counter[str]:
    seen: Counter[str] = Counter()
    for _ in range(n):
        response = client.post("/v1/chat/completions", json={}, headers=headers)
        response.raise_for_status()
        seen[response.json()["headers"]["x-canaryflow-role"]] += 1
    return seen


def test_controller_implements_the_protocol(controller: EnvoyRoutes) -> None:
    assert isinstance(controller, TrafficController)


@pytest.mark.parametrize("weight", [5.0, 20.0])
def test_canary_share_follows_the_weight(
    controller: EnvoyRoutes, client: httpx.Client, weight: float
) -> None:
    controller.set_routes(Routes(service=SERVICE, stable="1", canary="2", weight=weight))
    n = 500
    seen = roles(client, n)
    assert set(seen) <= {"stable", "canary"}
    assert seen["canary"] > 0
    # Inside the 99.9% two-sided binomial interval around the configured share.
    assert binomtest(seen["canary"], n, weight / 100).pvalue > 0.001, seen


def test_role_and_version_headers_overwrite_client_values(
    controller: EnvoyRoutes, client: httpx.Client, upstreams: dict[str, Upstream]
) -> None:
    controller.set_routes(Routes(service=SERVICE, stable="1", canary="2", weight=100))
    forged = {
        "x-canaryflow-role": "stable",
        "x-canaryflow-version": "999",
        "x-canaryflow-shadow-version": "evil",
        "x-canaryflow-mirror": "1",
        "x-canaryflow-synthetic": "1",
        "x-request-id": "chosen-by-the-client",
        "host": "evil-shadow",
    }
    got = client.get("/v1/models", headers=forged).json()["headers"]
    assert got["x-canaryflow-role"] == "canary"
    assert got["x-canaryflow-version"] == "2"
    for dropped in ("x-canaryflow-shadow-version", "x-canaryflow-mirror", "x-canaryflow-synthetic"):
        assert dropped not in got
    assert got["x-request-id"] != "chosen-by-the-client"  # Envoy makes its own
    assert got["host"] == SERVICE  # a client cannot pass itself off as a mirrored copy
    [arrival] = upstreams["primary"].records()
    assert arrival["headers"]["x-canaryflow-role"] == "canary"


def test_mirrored_copy_has_shadow_host_version_and_same_request_id(
    controller: EnvoyRoutes, client: httpx.Client, upstreams: dict[str, Upstream]
) -> None:
    controller.set_routes(Routes(service=SERVICE, stable="1", shadow="3", mirror_percent=100.0))
    ids = {
        client.post("/v1/chat/completions", json={}).json()["headers"]["x-request-id"]
        for _ in range(10)
    }
    copies: list[dict[str, Any]] = []

    def every_copy_arrived() -> bool:
        copies.extend(upstreams["shadow"].records())
        return len(copies) >= len(ids)

    wait_for(f"the {len(ids)} mirrored copies at the shadow", every_copy_arrived, 5, 0.1)
    assert {copy["headers"]["x-request-id"] for copy in copies} == ids
    for copy in copies:
        assert copy["headers"]["host"] == f"{SERVICE}-shadow"
        assert copy["headers"]["x-canaryflow-shadow-version"] == "3"
        assert copy["headers"]["x-canaryflow-mirror"] == "1"
    primary = upstreams["primary"].records()
    assert {rec["headers"]["x-request-id"] for rec in primary} == ids
    assert all(rec["headers"]["host"] == SERVICE for rec in primary)
    assert not any("x-canaryflow-mirror" in rec["headers"] for rec in primary)


def test_slow_shadow_does_not_delay_the_client(
    controller: EnvoyRoutes, client: httpx.Client, upstreams: dict[str, Upstream]
) -> None:
    """Each client has its answer while the shadow (500 ms a request) still works on the copy.

    An order of events, not a speed: were the mirror awaited, every client answer would come
    after the shadow's. Both sides stamp with time.monotonic(), one clock for all processes.
    """
    controller.set_routes(Routes(service=SERVICE, stable="1", shadow="3", mirror_percent=100.0))
    answered: dict[str, float] = {}
    for _ in range(10):
        response = client.post("/v1/chat/completions", json={})
        response.raise_for_status()
        answered[response.json()["headers"]["x-request-id"]] = time.monotonic()

    def shadow_answers() -> dict[str, float]:
        copies = upstreams["shadow"].records(clear=False)
        found = {c["headers"]["x-request-id"]: c.get("answered") for c in copies}
        done = {rid: found[rid] for rid in answered if found.get(rid) is not None}
        return done if len(done) == len(answered) else {}

    shadow_done = wait_for("the shadow's answers to the 10 copies", shadow_answers, 15, 0.1)
    late = {rid: shadow_done[rid] - at for rid, at in answered.items() if at >= shadow_done[rid]}
    assert not late, f"clients answered only after the shadow (s after the copy): {late}"


def test_mirror_share_follows_mirror_percent(
    controller: EnvoyRoutes,
    proxy: EnvoyProxy,
    client: httpx.Client,
) -> None:
    controller.set_routes(Routes(service=SERVICE, stable="1", shadow="3", mirror_percent=30.0))
    before = proxy.cluster_stats()
    n = 400
    roles(client, n)
    mirrored = proxy.cluster_stats()["shadow"] - before["shadow"]
    assert binomtest(mirrored, n, 0.30).pvalue > 0.001, mirrored


def test_set_routes_is_live_before_it_returns(
    controller: EnvoyRoutes, proxy: EnvoyProxy, client: httpx.Client
) -> None:
    routes = Routes(service=SERVICE, stable="1", canary="7", weight=100)
    assert controller.set_routes(routes) == routes
    version, on_disk = read_route_file(proxy.route_path)
    assert on_disk == routes == controller.current()
    assert controller.live_version() == str(version)
    dump = httpx.get(f"{proxy.admin_url}/config_dump?resource=dynamic_route_configs").json()
    assert dump["configs"][0]["version_info"] == str(version)
    # The very first request after the call already follows the new routes.
    assert client.get("/v1/models").json()["headers"]["x-canaryflow-version"] == "7"


def test_rollback_sends_nothing_to_the_canary_afterwards(
    controller: EnvoyRoutes, client: httpx.Client, upstreams: dict[str, Upstream]
) -> None:
    controller.set_routes(Routes(service=SERVICE, stable="1", canary="2", weight=50))
    assert roles(client, 50)["canary"] > 0
    back = controller.rollback()
    assert back.after == Routes(service=SERVICE, stable="1") == controller.current()
    upstreams["primary"].records()
    assert roles(client, 200) == Counter(stable=200)
    arrivals = upstreams["primary"].records()
    assert len(arrivals) == 200
    assert all(rec["headers"]["x-canaryflow-role"] == "stable" for rec in arrivals)


def test_refused_update_raises_and_old_routes_keep_serving(
    controller: EnvoyRoutes, proxy: EnvoyProxy, client: httpx.Client
) -> None:
    good = Routes(service=SERVICE, stable="1", canary="2", weight=100)
    controller.set_routes(good)
    # A forward move and a retreat (all to another version) that Envoy refuses: both can never
    # go live, so the previous routes, still serving, are written back with a newer version.
    for refused in (
        Routes(service=SERVICE, stable="1", canary="2\nbroken", weight=50),
        Routes(service=SERVICE, stable="1\nbroken"),
    ):
        before = read_route_file(proxy.route_path)[0]
        with pytest.raises(StackError, match=r"refused routes .*HeaderValueValidationError"):
            controller.set_routes(refused)
        assert controller.current() == good
        version, routes = read_route_file(proxy.route_path)
        assert routes == good and version == before + 2  # the refused one, then good again
        assert roles(client, 20) == Counter(canary=20)
    # The next valid change still goes through, and starts from what is live.
    assert controller.rollback() == RouteChange(good, Routes(service=SERVICE, stable="1"))


# inotify(7): the kernel reports every open of a file in a watched folder, by any process. It
# merges an event into an identical one just before it, so closes are watched too: two reads
# in a row show as open, close, open, close and both opens count.
_WATCHED = {0x10: "close", 0x20: "open", 0x80: "moved_to"}  # IN_CLOSE_NOWRITE, IN_OPEN, ...
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, name length


@contextmanager
def file_events(folder: Path) -> Iterator[Callable[[], list[tuple[str, str]]]]:
    """Events on files in `folder`, in order: ("open" | "close" | "moved_to", file name)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_NONBLOCK)
    if fd < 0 or libc.inotify_add_watch(fd, bytes(folder), sum(_WATCHED)) < 0:
        pytest.fail(
            f"inotify (Linux) is needed to count file reads: {os.strerror(ctypes.get_errno())}"
        )
    seen: list[tuple[str, str]] = []

    def events() -> list[tuple[str, str]]:
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return seen
            at = 0
            while at < len(data):
                _, mask, _, size = _EVENT.unpack_from(data, at)
                name = data[at + _EVENT.size : at + _EVENT.size + size].rstrip(b"\0").decode()
                at += _EVENT.size + size
                seen.append((next(k for bit, k in _WATCHED.items() if mask & bit), name))

    try:
        yield events
    finally:
        os.close(fd)


def test_rollback_reads_the_route_file_once_and_reports_before_and_after(
    controller: EnvoyRoutes, proxy: EnvoyProxy, client: httpx.Client
) -> None:
    from canaryflow import runbook

    canary = Routes(service=SERVICE, stable="1", canary="2", weight=50, shadow="3")
    controller.set_routes(canary)
    name = proxy.route_path.name
    with file_events(proxy.route_path.parent) as events:
        result = runbook.rollback_traffic(endpoints_of(proxy), SERVICE)
        seen = events()
    assert (result.before, result.after) == (canary, Routes(service=SERVICE, stable="1"))
    # Opens before the new file is renamed in are ours; Envoy reads the new file after it.
    swap = seen.index(("moved_to", name))
    assert seen[:swap].count(("open", name)) == 1, seen
    assert seen.count(("moved_to", name)) == 1, seen  # one write, no restore
    assert roles(client, 20) == Counter(stable=20)


def test_release_steps_build_the_controller_without_the_process(
    proxy: EnvoyProxy, client: httpx.Client
) -> None:
    """`connections.traffic_controller` in a fresh interpreter: the process module never loads."""
    script = (
        "import sys\n"
        "from canaryflow import connections\n"
        "from canaryflow.contracts import Endpoints, Routes\n"
        "routes = Routes.model_validate_json(sys.argv[2])\n"
        "controller = connections.traffic_controller(\n"
        "    Endpoints.model_validate_json(sys.argv[1]), routes.service\n"
        ")\n"
        "controller.set_routes(routes)\n"
        "print(type(controller).__name__, 'canaryflow.dataplane.envoy' in sys.modules)\n"
    )
    routes = Routes(service=SERVICE, stable="1", canary="8", weight=100)
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            endpoints_of(proxy).model_dump_json(),
            routes.model_dump_json(),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["EnvoyRoutes", "False"]
    # Confirmed live before the call returned: the next request already follows it.
    assert client.get("/v1/models").json()["headers"]["x-canaryflow-version"] == "8"


def test_bad_input_is_refused_before_envoy_sees_it(controller: EnvoyRoutes) -> None:
    with pytest.raises(ConfigError, match="sticky_header"):
        controller.set_routes(Routes(service=SERVICE, stable="1", sticky_header="x user"))
    with pytest.raises(ConfigError, match="each service has its own proxy"):
        controller.set_routes(Routes(service="other", stable="1"))


def test_sticky_header_keeps_each_user_on_one_side(
    controller: EnvoyRoutes, client: httpx.Client
) -> None:
    controller.set_routes(
        Routes(
            service=SERVICE, stable="1", canary="2", weight=50, sticky_header="x-canaryflow-user"
        )
    )
    seen: dict[str, set[str]] = defaultdict(set)
    for i in range(160):
        user = f"user-{i % 40}"
        seen[user] |= set(roles(client, 1, headers={"x-canaryflow-user": user}))
    assert all(len(sides) == 1 for sides in seen.values()), seen
    assert Counter(next(iter(sides)) for sides in seen.values()).keys() == {"stable", "canary"}


def test_cluster_stats_count_requests(
    controller: EnvoyRoutes, proxy: EnvoyProxy, client: httpx.Client
) -> None:
    controller.set_routes(Routes(service=SERVICE, stable="1"))
    before = proxy.cluster_stats()
    roles(client, 25)
    after = proxy.cluster_stats()
    assert set(after) == {"stable", "canary", "shadow"}
    assert after["stable"] - before["stable"] == 25
    assert after["canary"] == before["canary"]


def test_feedback_goes_to_stable_alone_and_is_never_mirrored(
    controller: EnvoyRoutes, proxy: EnvoyProxy, client: httpx.Client
) -> None:
    """All traffic on the canary, every request mirrored: ratings still reach stable, once."""
    controller.set_routes(
        Routes(service=SERVICE, stable="1", canary="2", weight=100, shadow="3", mirror_percent=100)
    )
    before = proxy.cluster_stats()
    for n in range(10):
        response = client.post("/v1/feedback", json={"request_id": f"r{n}", "score": 1})
        response.raise_for_status()
        got = response.json()["headers"]
        assert got["host"] == SERVICE
        assert not {"x-canaryflow-role", "x-canaryflow-version", "x-canaryflow-mirror"} & set(got)
    roles(client, 5)  # the split and the mirror still hold for everything else
    after = proxy.cluster_stats()
    assert after["stable"] - before["stable"] == 10
    assert after["canary"] - before["canary"] == 5
    wait_for(  # the 5 chat copies only, none of the ratings
        "5 mirrored copies", lambda: proxy.cluster_stats()["shadow"] - before["shadow"] == 5, 5
    )
    too_big = client.post("/v1/feedback", content=b"x" * (1024 * 1024 + 1))
    assert too_big.status_code == 413  # the edge's body cap holds here too


def _listening_addresses(port: int) -> set[str]:
    """Local addresses of listening TCP sockets on `port`, read from the kernel's tables."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


def test_admin_listens_on_loopback_only(proxy: EnvoyProxy) -> None:
    assert _listening_addresses(proxy.admin_port) == {"0100007F"}  # 127.0.0.1, no IPv6
    assert httpx.get(f"{proxy.admin_url}/ready").text.strip() == "LIVE"
    bootstrap = yaml.safe_load(proxy.bootstrap_path.read_text())
    assert bootstrap["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))  # no packet is sent; picks the outward interface
        outward = probe.getsockname()[0]
    if outward != "127.0.0.1":
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://{outward}:{proxy.admin_port}/ready", timeout=1.0)


def test_which_writes_are_retreats() -> None:
    canary = Routes(service=SERVICE, stable="1", canary="2", weight=25, shadow="3",
                    mirror_percent=50)  # fmt: skip
    stable = Routes(service=SERVICE, stable="1")
    assert is_retreat(canary, stable)
    assert is_retreat(canary, canary.model_copy(update={"weight": 5}))
    assert is_retreat(canary, canary.model_copy(update={"mirror_percent": 10}))
    assert is_retreat(canary, Routes(service=SERVICE, stable="0"))  # on-call: all to v0
    assert is_retreat(canary, canary)
    assert not is_retreat(canary, canary.model_copy(update={"weight": 50}))
    assert not is_retreat(canary, canary.model_copy(update={"canary": "4"}))
    assert not is_retreat(canary, Routes(service=SERVICE, stable="2"))  # promotion
    assert not is_retreat(canary, Routes(service=SERVICE, stable="3"))  # the shadow promoted
    assert not is_retreat(stable, canary)
    assert not is_retreat(None, stable)


def test_a_canary_step_after_a_rollback_it_did_not_see_is_refused(proxy: EnvoyProxy) -> None:
    release = EnvoyRoutes(proxy.home, proxy.admin_url, service=SERVICE)
    on_call = EnvoyRoutes(proxy.home, proxy.admin_url, service=SERVICE)
    release.set_routes(Routes(service=SERVICE, stable="1", canary="2", weight=5))
    on_call.rollback()
    rolled_back = read_route_file(proxy.route_path)
    with pytest.raises(RoutesChanged, match="a rollback wins"):
        release.set_routes(Routes(service=SERVICE, stable="1", canary="2", weight=25))
    with pytest.raises(RoutesChanged):
        release.set_routes(Routes(service=SERVICE, stable="2"))  # nor promote it
    assert read_route_file(proxy.route_path) == rolled_back  # nothing written
    # Less traffic is always allowed; a new release (another version, or a controller that
    # saw the rollback) may start.
    release.set_routes(Routes(service=SERVICE, stable="1"))
    fresh = EnvoyRoutes(proxy.home, proxy.admin_url, service=SERVICE)
    fresh.set_routes(Routes(service=SERVICE, stable="1", canary="2", weight=5))
    on_call.set_routes(Routes(service=SERVICE, stable="1", canary="9", weight=5))
    release.set_routes(Routes(service=SERVICE, stable="1", canary="2", weight=5))
    assert on_call.rollback().after == Routes(service=SERVICE, stable="1")
    for routes in (release, on_call, fresh):
        routes.close()


def test_compare_and_swap_refuses_a_write_based_on_a_stale_version(
    controller: EnvoyRoutes, proxy: EnvoyProxy
) -> None:
    controller.set_routes(Routes(service=SERVICE, stable="1"))
    seen = controller.current_version()
    assert seen is not None and seen == controller.last_version
    other = EnvoyRoutes(proxy.home, proxy.admin_url, service=SERVICE)
    other.set_routes(Routes(service=SERVICE, stable="1", canary="7", weight=10))
    with pytest.raises(RoutesChanged, match=f"not {seen}"):
        controller.set_routes(Routes(service=SERVICE, stable="1"), expected_version=seen)
    assert read_route_file(proxy.route_path)[1] == other.current()
    now = controller.current_version()
    assert now is not None
    assert controller.set_routes(Routes(service=SERVICE, stable="1"), expected_version=now)
    assert controller.current_version() == now + 1
    other.close()


def test_a_held_lock_blocks_a_forward_write_but_not_a_rollback(
    controller: EnvoyRoutes, proxy: EnvoyProxy, client: httpx.Client
) -> None:
    controller.set_routes(Routes(service=SERVICE, stable="1", canary="2", weight=50))
    impatient = EnvoyRoutes(proxy.home, proxy.admin_url, service=SERVICE, lock_timeout_s=0.3)
    lock = os.open(controller.lock_path, os.O_RDWR)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a writer that hangs while holding it
        os.write(lock, b"pid 1 (hung writer)")
        with pytest.raises(RoutesBusy, match=r"pid 1 \(hung writer\)"):
            impatient.set_routes(Routes(service=SERVICE, stable="1", canary="2", weight=100))
        # A rollback waits lock_timeout_s, then writes anyway: a hung writer cannot keep
        # traffic on the canary.
        change = impatient.rollback()
    finally:
        os.close(lock)
    assert change.after == Routes(service=SERVICE, stable="1") == controller.current()
    assert roles(client, 20) == Counter(stable=20)
    impatient.close()


def test_a_damaged_route_file_is_refused_until_all_traffic_goes_to_one_version(
    proxy: EnvoyProxy, client: httpx.Client
) -> None:
    controller = EnvoyRoutes(proxy.home, proxy.admin_url, service=SERVICE)
    controller.set_routes(Routes(service=SERVICE, stable="1", canary="2", weight=50))
    body = proxy.route_path.read_text().split("\n", 1)[1]
    damaged = proxy.route_path.with_name("damaged.tmp")
    damaged.write_text('# canaryflow-routes: {"version": "x"}\n' + body)
    os.rename(damaged, proxy.route_path)
    with pytest.raises(StackError, match="damaged canaryflow mark"):
        controller.rollback()
    with pytest.raises(StackError, match="damaged canaryflow mark"):
        controller.set_routes(Routes(service=SERVICE, stable="1", canary="2", weight=5))
    controller.set_routes(Routes(service=SERVICE, stable="1"))  # what on-call's --to does
    assert controller.current() == Routes(service=SERVICE, stable="1")
    assert roles(client, 20) == Counter(stable=20)
    controller.close()


def test_routes_survive_an_envoy_restart(tmp_path: Path, upstreams: dict[str, Upstream]) -> None:
    envoy = make_proxy(tmp_path, upstreams, initial=None)
    envoy.start()
    try:
        first = EnvoyRoutes(envoy.home, envoy.admin_url, service=SERVICE)
        assert first.current() is None
        assert httpx.get(f"{envoy.url}/v1/models").status_code == 503
        with pytest.raises(StackError, match="nothing to roll back to"):
            first.rollback()
        routes = Routes(service=SERVICE, stable="4", canary="5", weight=100)
        first.set_routes(routes)
        envoy.stop()
        envoy.start()
        second = EnvoyRoutes(envoy.home, envoy.admin_url, service=SERVICE)
        assert second.current() == routes
        got = httpx.get(f"{envoy.url}/v1/models").json()["headers"]
        assert (got["x-canaryflow-role"], got["x-canaryflow-version"]) == ("canary", "5")
        assert second.rollback() == RouteChange(routes, Routes(service=SERVICE, stable="4"))
    finally:
        envoy.stop()


# ---- the echo upstream (this file run as a script) ----------------------------------------


def serve_echo(port: int, delay_s: float) -> None:
    from aiohttp import web

    records: list[dict[str, Any]] = []

    async def handle(request: web.Request) -> web.Response:
        if request.path == "/_health":
            return web.json_response({})
        if request.path == "/_records":
            out = list(records)
            if request.query.get("clear"):
                records.clear()
            return web.json_response(out)
        headers = {key.lower(): value for key, value in request.headers.items()}
        record: dict[str, Any] = {"t": time.monotonic(), "headers": headers}
        records.append(record)
        await request.read()
        if delay_s:
            await asyncio.sleep(delay_s)
        record["answered"] = time.monotonic()
        return web.json_response({"headers": headers})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


if __name__ == "__main__":
    serve_echo(int(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 0.0)


def test_a_probe_reaches_the_role_it_names_on_the_synthetic_listener_only(
    controller: EnvoyRoutes, proxy: EnvoyProxy, upstreams: dict[str, Upstream]
) -> None:
    """Stable takes every user; a probe naming canary still reaches the canary cluster with
    canary's headers and is not mirrored. The same headers from a user (the probe target and a
    forged synthetic mark) are dropped before the route is picked, so they steer nothing."""
    controller.set_routes(
        Routes(service=SERVICE, stable="1", canary="2", weight=0.0, shadow="3", mirror_percent=100)
    )
    assert proxy.synthetic_url is not None
    target = {"x-canaryflow-probe-target": "canary"}
    before = proxy.cluster_stats()
    with httpx.Client(base_url=proxy.synthetic_url, timeout=5.0) as synthetic:
        for _ in range(5):
            got = synthetic.post("/v1/chat/completions", json={}, headers=target).json()["headers"]
            assert got["x-canaryflow-role"] == "canary"
            assert got["x-canaryflow-version"] == "2"
            assert got["x-canaryflow-synthetic"] == "1"
            assert got["host"] == SERVICE
        shadow = synthetic.post(
            "/v1/chat/completions", json={}, headers={"x-canaryflow-probe-target": "shadow"}
        ).json()["headers"]
        assert (shadow["x-canaryflow-role"], shadow["x-canaryflow-version"]) == ("shadow", "3")
        assert "x-canaryflow-mirror" not in shadow
    after = proxy.cluster_stats()
    assert after["canary"] - before["canary"] == 5
    assert after["shadow"] - before["shadow"] == 1  # the shadow probe itself, no mirrored copy
    assert after["stable"] == before["stable"]

    with httpx.Client(base_url=proxy.url, timeout=5.0) as public:
        for _ in range(5):
            forged = {**target, "x-canaryflow-synthetic": "1"}  # both marks, forged by a user
            got = public.post("/v1/chat/completions", json={}, headers=forged).json()["headers"]
            assert got["x-canaryflow-role"] == "stable"
            assert "x-canaryflow-probe-target" not in got
            assert "x-canaryflow-synthetic" not in got
    users = proxy.cluster_stats()
    assert users["stable"] - after["stable"] == 5
    assert users["canary"] == after["canary"]
    wait_for(  # the users' requests are mirrored as usual
        "5 mirrored copies", lambda: proxy.cluster_stats()["shadow"] - after["shadow"] == 5, 5
    )
