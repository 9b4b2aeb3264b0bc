"""The data plane's edge under hostile input, as it runs: a real Envoy (client and synthetic
listeners, 100% mirror) in front of two real `canaryflow serve` processes (primary, shadow) that
call a real sandbox provider and write one SQLite store.

Raw sockets where the client must misbehave (a 64 MiB Content-Length, an endless chunked body):
a sender thread keeps pushing the body while the test waits for the answer, so a server that
read the body before answering would be seen waiting (time) or growing (memory). Times and
memory are printed (`FIGURE ...`, `pytest -s`); docs/reliability.md holds the figures.
"""

from __future__ import annotations

import contextlib
import socket
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from canaryflow.contracts import RequestRecord, Routes
from canaryflow.dataplane.envoy_routes import EnvoyRoutes
from canaryflow.dataplane.store import Store
from canaryflow.local.envoy import EnvoyProxy
from canaryflow.local.processes import ManagedProcess, free_port, http_ok
from tests.faults.test_pii_faults import manifest
from tests.waiting import wait_for

SERVICE = "pii-faults"  # the manifest's service
LIMIT = 1024 * 1024  # the default cap, Envoy's and the service's
HUGE = 64 * 1024 * 1024
MAX_ANSWER_S = 1.0  # what "refused before reading" means here: far less than reading 64 MiB
MAX_RSS_GROWTH_KIB = 8 * 1024
ROUNDS = 3


@dataclass
class Edge:
    envoy: EnvoyProxy
    routes: EnvoyRoutes
    primary: ManagedProcess
    primary_port: int
    primary_admin: str
    store_path: Path

    @property
    def envoy_port(self) -> int:
        return self.envoy.listen_port


def pid_of(process: ManagedProcess | EnvoyProxy) -> int:
    if isinstance(process, EnvoyProxy):
        pid = process.pid
    else:
        pid = process.process.pid if process.process is not None else None
    assert pid is not None
    return pid


def peak_kib(pid: int) -> int:
    """VmHWM: the most resident memory the process ever had."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def service_process(
    home: Path, name: str, sandbox: str, store: Path
) -> tuple[ManagedProcess, int, int]:
    port, admin = free_port(), free_port()
    files = {}
    for version in ("1", "2"):
        files[version] = home / f"manifest-{version}.json"
        files[version].write_text(manifest().model_dump_json())
    process = ManagedProcess(
        f"model-service-{name}",
        [sys.executable, "-m", "canaryflow.dataplane.serve", "--service", SERVICE,
         "--port", str(port), "--admin-port", str(admin),
         "--manifest", f"1={files['1']}", "--manifest", f"2={files['2']}",
         "--provider-url", f"sandbox={sandbox}", "--store", str(store),
         "--default-version", "1", "--check-sample", "0"],
        home / f"service-{name}.log",
        http_ok(f"http://127.0.0.1:{port}/health"),
    )  # fmt: skip
    return process, port, admin


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    home = tmp_path_factory.mktemp("edge-faults")
    sandbox_port = free_port()
    sandbox_url = f"http://127.0.0.1:{sandbox_port}"
    store = home / "records.db"
    started: list[ManagedProcess | EnvoyProxy] = []
    try:
        sandbox = ManagedProcess(
            "sandbox",
            [sys.executable, "-m", "canaryflow.sandbox", "--host", "127.0.0.1",
             "--port", str(sandbox_port)],
            home / "sandbox.log",
            http_ok(f"{sandbox_url}/health"),
        )  # fmt: skip
        started.append(sandbox)
        primary, primary_port, primary_admin = service_process(home, "primary", sandbox_url, store)
        shadow, shadow_port, _ = service_process(home, "shadow", sandbox_url, store)
        started += [primary, shadow]
        threads = [threading.Thread(target=p.start, args=(60,)) for p in (sandbox, primary, shadow)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert all(p.running() for p in (sandbox, primary, shadow))
        envoy = EnvoyProxy(
            home / "envoy",
            service=SERVICE,
            listen_port=free_port(),
            admin_port=free_port(),
            upstreams={
                "stable": ("127.0.0.1", primary_port),
                "canary": ("127.0.0.1", primary_port),
                "shadow": ("127.0.0.1", shadow_port),
            },
            initial_stable="1",
            synthetic_port=free_port(),
        )
        started.append(envoy)
        envoy.start(30)
        routes = EnvoyRoutes(envoy.home, envoy.admin_url, service=SERVICE)
        routes.set_routes(Routes(service=SERVICE, stable="1", shadow="2", mirror_percent=100.0))
        yield Edge(envoy, routes, primary, primary_port, f"http://127.0.0.1:{primary_admin}", store)
        routes.close()
    finally:
        for process in reversed(started):
            process.stop()


# --------------------------------------------------------------------------- raw HTTP


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(head.split(b" ", 2)[1]), body


def oversized(port: int, *, chunked: bool) -> tuple[int, bytes, float]:
    """Send a body over the cap (64 MiB declared, or chunks without end) from a thread; return
    the status, the body and the seconds from the request's headers to the whole answer."""
    secret = b"do-not-echo-" + uuid.uuid4().hex.encode()
    framing = b"transfer-encoding: chunked" if chunked else b"content-length: %d" % HUGE
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: edge\r\ncontent-type: application/json\r\n"
        + framing
        + b"\r\n\r\n"
    )
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    stop = threading.Event()

    def send_body() -> None:
        piece = b'{"messages": [{"role": "user", "content": "' + secret + b"x" * 65_000
        with contextlib.suppress(OSError):
            sent = 0
            while not stop.is_set() and (chunked or sent < HUGE):
                data = b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece[: HUGE - sent]
                sock.sendall(data)
                sent += len(piece)

    sock.sendall(head)
    started = time.perf_counter()
    sender = threading.Thread(target=send_body, daemon=True)
    sender.start()
    try:
        status, body = read_response(sock)
        took = time.perf_counter() - started
    finally:
        stop.set()
        sock.close()
        sender.join(timeout=10)
    assert secret not in body, "the refusal echoed the submitted body"
    return status, body, took


def refused_each_round(edge: Edge, port: int, pid: int, chunked: bool, where: str) -> None:
    before = edge.envoy.cluster_stats()
    peak = peak_kib(pid)
    times = []
    for _ in range(ROUNDS):
        status, body, took = oversized(port, chunked=chunked)
        assert status == 413, body
        assert b"1048576 bytes" in body and b"--max-body-bytes" in body
        times.append(took)
    growth = peak_kib(pid) - peak
    kind = "chunked" if chunked else "64 MiB Content-Length"
    print(
        f"\nFIGURE {kind} at {where}: 413 in median {statistics.median(times) * 1000:.1f} ms "
        f"(min {min(times) * 1000:.1f}, max {max(times) * 1000:.1f}, {ROUNDS} rounds); "
        f"peak RSS +{growth} KiB"
    )
    assert max(times) < MAX_ANSWER_S, times
    assert growth < MAX_RSS_GROWTH_KIB, f"peak RSS grew {growth} KiB"
    if where == "envoy":
        assert edge.envoy.cluster_stats() == before, "an oversized body reached a service"


# --------------------------------------------------------------------------- body limits


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_an_oversized_body_is_refused_at_envoy(edge: Edge, chunked: bool) -> None:
    refused_each_round(edge, edge.envoy_port, pid_of(edge.envoy), chunked, "envoy")


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_an_oversized_body_is_refused_at_the_service(edge: Edge, chunked: bool) -> None:
    """Past Envoy (a direct caller, a misconfigured edge): the service's own cap."""
    refused_each_round(edge, edge.primary_port, pid_of(edge.primary), chunked, "service")
    assert httpx.get(f"http://127.0.0.1:{edge.primary_port}/health").status_code == 200


# --------------------------------------------------------------------------- listeners


def test_the_public_listener_has_no_admin_routes(edge: Edge) -> None:
    for base in (edge.envoy.url, f"http://127.0.0.1:{edge.primary_port}"):
        assert httpx.get(f"{base}/metrics").status_code == 404
        assert httpx.post(f"{base}/admin/warm", json={"version": "1"}).status_code == 404
    assert httpx.get(f"{edge.primary_admin}/metrics").status_code == 200
    warmed = httpx.post(f"{edge.primary_admin}/admin/warm", json={"version": "2"}, timeout=10)
    assert warmed.status_code == 200, warmed.text


# --------------------------------------------------------------------------- headers


def chat(url: str, text: str, headers: dict[str, str] | None = None) -> httpx.Response:
    body = {"model": "canaryflow", "messages": [{"role": "user", "content": text}]}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers or {}, timeout=10)
    assert r.status_code == 200, r.text
    return r


def records_with(edge: Edge, marker: str, count: int) -> list[RequestRecord]:
    """The stored records whose prompt holds `marker` (synthetic ones too), once `count` are in."""

    def found() -> list[RequestRecord]:
        now = datetime.now(UTC)
        with Store(edge.store_path) as store:
            rows = store.records(SERVICE, now - timedelta(minutes=5), now + timedelta(minutes=1),
                                 synthetic=None)  # fmt: skip
        mine = [r for r in rows if marker in r.prompt]
        return mine if len(mine) >= count else []

    return wait_for(f"{count} records of {marker}", found, 10, 0.1)


def test_a_client_request_id_never_becomes_the_records_id(edge: Edge) -> None:
    marker = f"dup-{uuid.uuid4().hex[:8]}"
    answers = [
        chat(edge.envoy.url, f"{marker} question {n}", {"x-request-id": "same-id"})
        for n in range(2)
    ]
    ids = {r.headers["x-request-id"] for r in answers}
    assert len(ids) == 2 and "same-id" not in ids
    records = records_with(edge, marker, 4)  # two primaries, two mirrored copies
    by_role: dict[str, set[str]] = {}
    for record in records:
        by_role.setdefault(record.role.value, set()).add(record.request_id)
    # Two distinct records, and each mirrored copy keeps its primary's id.
    assert by_role == {"stable": ids, "shadow": ids}


def test_client_sent_edge_headers_have_no_effect(edge: Edge) -> None:
    marker = f"forged-{uuid.uuid4().hex[:8]}"
    forged = {
        "x-canaryflow-role": "canary",
        "x-canaryflow-version": "2",
        "x-canaryflow-mirror": "1",
        "x-canaryflow-synthetic": "1",
        "x-canaryflow-shadow-version": "9",
    }
    r = chat(edge.envoy.url, marker, forged)
    assert (r.headers["x-canaryflow-role"], r.headers["x-canaryflow-version"]) == ("stable", "1")
    records = records_with(edge, marker, 2)
    assert {(rec.role.value, rec.version) for rec in records} == {("stable", "1"), ("shadow", "2")}
    assert not any(rec.synthetic for rec in records)


def test_mirrored_copies_carry_the_mirror_header(edge: Edge) -> None:
    """The shadow service makes a request a shadow only on `x-canaryflow-mirror: 1` (a `-shadow`
    Host alone is refused 400), so a stored shadow record is a copy that carried it."""
    marker = f"mirror-{uuid.uuid4().hex[:8]}"
    ids = {chat(edge.envoy.url, f"{marker} {n}").headers["x-request-id"] for n in range(3)}
    shadows = [r for r in records_with(edge, marker, 6) if r.role.value == "shadow"]
    assert {r.request_id for r in shadows} == ids
    assert all(r.status == 200 for r in shadows)


def test_the_synthetic_listener_marks_its_requests(edge: Edge) -> None:
    assert edge.envoy.synthetic_url is not None
    marker = f"synthetic-{uuid.uuid4().hex[:8]}"
    chat(edge.envoy.synthetic_url, marker)
    records = records_with(edge, marker, 2)
    assert all(rec.synthetic for rec in records)
    assert {rec.role.value for rec in records} == {"stable", "shadow"}
