"""The CI webhook receiver under hostile input, as it runs: its own process (`python -m
deployments.webhook`, the command `canaryflow up` runs), over real HTTP, in front of a real Prefect
server with a `release/release` deployment, so that "no run was started" is read from Prefect.

Raw sockets where the client must misbehave (a 64 MiB Content-Length, an endless chunked body).
Each refusal's time to answer and the receiver's memory are measured and printed (`-s`).
"""

from __future__ import annotations

import contextlib
import json
import socket
import stat
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterIdempotencyKey

from canaryflow.app.approvals import prefect_client
from canaryflow.deliveries import REPLAY_FILE, WEBHOOK_PATH, sign_payload
from canaryflow.local import examples
from canaryflow.local.processes import ManagedProcess, free_port, http_ok
from canaryflow.registry.signing import generate_keypair, sign

REPO = Path(__file__).resolve().parents[2]
SECRET = "webhook-faults-secret"
LIMIT = 1024 * 1024  # the receiver's default body limit
HUGE = 64 * 1024 * 1024
# What "small" means for the receiver's answer to an oversized body.
MAX_ANSWER_S = 1.0
MAX_RSS_GROWTH_KIB = 8 * 1024


@pytest.fixture(scope="module")
def prefect_api(prefect_api: str) -> str:
    """The session's real Prefect server, with the `release/release` deployment."""
    with prefect_client(prefect_api) as client:
        flow_id = client.create_flow_from_name("release")
        client.create_deployment(flow_id=flow_id, name="release")
    return prefect_api


@dataclass
class Receiver:
    process: ManagedProcess
    url: str
    port: int

    @property
    def pid(self) -> int:
        assert self.process.process is not None
        return self.process.process.pid

    def memory_kib(self) -> dict[str, int]:
        """VmRSS (now) and VmHWM (peak) of the receiver process, from /proc."""
        fields = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in {"VmRSS", "VmHWM"}:
                fields[name] = int(value.split()[0])
        return fields


def start_receiver(
    state_dir: Path, prefect_api: str, home: Path, env: dict[str, str] | None = None
) -> Receiver:
    secret_file = home / "webhook.secret"
    if not secret_file.exists():
        secret_file.write_text(SECRET)
        secret_file.chmod(0o600)
    port = free_port()
    command = [
        sys.executable, "-m", "deployments.webhook",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--prefect-api", prefect_api,
        "--state-dir", str(state_dir),
        "--secret-file", str(secret_file),
    ]  # fmt: skip
    process = ManagedProcess(
        name="webhook",
        command=command,
        log_path=home / "webhook.log",
        ready=http_ok(f"http://127.0.0.1:{port}/health"),
        cwd=REPO,
        env=env or {},
    )
    process.start(timeout_s=60)
    return Receiver(process, f"http://127.0.0.1:{port}", port)


@pytest.fixture(scope="module")
def receiver(prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Receiver]:
    home = tmp_path_factory.mktemp("receiver")
    running = start_receiver(home / "state", prefect_api, home)
    try:
        yield running
    finally:
        running.process.stop()


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    keys = generate_keypair(tmp_path_factory.mktemp("keys"), "ci", [examples.SERVICE])
    signed = sign(examples.manifest("3.0", "sandbox-good"), keys.private_path)
    return {"service": examples.SERVICE, "candidate": signed.model_dump(mode="json")}


@dataclass(frozen=True)
class Delivery:
    body: bytes
    timestamp: str
    delivery: str
    signature: str

    @property
    def headers(self) -> dict[str, str]:
        return {
            "content-type": "application/json",
            "x-canaryflow-timestamp": self.timestamp,
            "x-canaryflow-delivery": self.delivery,
            "x-canaryflow-signature": self.signature,
        }


def signed(spec: dict[str, object], *, timestamp: str | None = None) -> Delivery:
    body = json.dumps({"spec": spec}).encode()
    stamp = timestamp if timestamp is not None else str(int(time.time()))
    delivery = f"fault-{uuid.uuid4().hex[:12]}"
    return Delivery(body, stamp, delivery, sign_payload(SECRET, stamp, delivery, body))


def post(receiver: Receiver, delivery: Delivery) -> httpx.Response:
    return httpx.post(
        receiver.url + WEBHOOK_PATH, content=delivery.body, headers=delivery.headers, timeout=30
    )


def runs_with_key(prefect_api: str, delivery: str) -> list[str]:
    only = FlowRunFilter(
        idempotency_key=FlowRunFilterIdempotencyKey(any_=[f"ci-delivery-{delivery}"])
    )
    with prefect_client(prefect_api) as client:
        return [str(run.id) for run in client.read_flow_runs(flow_run_filter=only)]


def all_runs(prefect_api: str) -> int:
    with prefect_client(prefect_api) as client:
        return len(client.read_flow_runs())


def report(case: str, **figures: object) -> None:
    shown = ", ".join(f"{name}={value}" for name, value in figures.items())
    print(f"\n[webhook fault] {case}: {shown}")


def test_a_valid_delivery_starts_exactly_one_run(
    receiver: Receiver, prefect_api: str, spec: dict[str, object]
) -> None:
    delivery = signed(spec)
    before = all_runs(prefect_api)
    first = post(receiver, delivery)
    assert first.status_code == 202, first.text
    run_id = first.json()["flow_run_id"]
    again = post(receiver, delivery)  # the same request again: the same run, no new one
    assert again.status_code == 200, again.text
    assert again.json() == {"flow_run_id": run_id, "replayed": True}
    assert runs_with_key(prefect_api, delivery.delivery) == [run_id]
    assert all_runs(prefect_api) == before + 1


def test_the_same_body_under_a_new_delivery_id_with_the_old_signature_is_refused(
    receiver: Receiver, prefect_api: str, spec: dict[str, object]
) -> None:
    original = signed(spec)
    assert post(receiver, original).status_code == 202
    before = all_runs(prefect_api)
    forged_id = f"fault-{uuid.uuid4().hex[:12]}"
    forged = Delivery(original.body, original.timestamp, forged_id, original.signature)
    answer = post(receiver, forged)
    assert answer.status_code == 401, answer.text
    assert "signature does not match" in answer.json()["error"]
    assert runs_with_key(prefect_api, forged_id) == []
    assert all_runs(prefect_api) == before


@pytest.mark.parametrize(
    "timestamp", ["nan", "NaN", "inf", "-inf", "Infinity", "1e309", "-1", "99999999999"]
)
def test_non_finite_or_absurd_timestamps_are_refused_even_when_signed(
    receiver: Receiver, prefect_api: str, spec: dict[str, object], timestamp: str
) -> None:
    delivery = signed(spec, timestamp=timestamp)  # signed with the right secret
    answer = post(receiver, delivery)
    assert answer.status_code == 401, answer.text
    assert "X-Canaryflow-Timestamp" in answer.json()["error"]
    assert "unix seconds" in answer.json()["error"]
    assert runs_with_key(prefect_api, delivery.delivery) == []


def test_a_replay_after_a_restart_of_the_receiver_starts_no_second_run(
    prefect_api: str, spec: dict[str, object], tmp_path: Path
) -> None:
    state = tmp_path / "state"
    first = start_receiver(state, prefect_api, tmp_path)
    delivery = signed(spec)
    try:
        accepted = post(first, delivery)
    finally:
        first.process.stop()
    assert accepted.status_code == 202, accepted.text
    run_id = accepted.json()["flow_run_id"]
    assert stat.S_IMODE((state / REPLAY_FILE).stat().st_mode) == 0o600

    # A new process on the same state folder, pointed at a Prefect that does not answer: the
    # replay is answered from the replay memory alone, and could not have started anything.
    dead_api = f"http://127.0.0.1:{free_port()}/api"
    second = start_receiver(state, dead_api, tmp_path)
    try:
        started = time.monotonic()
        replayed = post(second, delivery)
        took = time.monotonic() - started
    finally:
        second.process.stop()
    assert replayed.status_code == 200, replayed.text
    assert replayed.json() == {"flow_run_id": run_id, "replayed": True}
    assert runs_with_key(prefect_api, delivery.delivery) == [run_id]
    report("replay after restart", status=replayed.status_code, answer_s=f"{took:.3f}")


def _read_response(sock: socket.socket, timeout_s: float = 10.0) -> tuple[int, bytes, bool]:
    """Status, body and whether the server closed the connection after answering."""
    sock.settimeout(timeout_s)
    data = b""
    closed = False
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            closed = True
            break
        if not chunk:
            closed = True
            break
        data += chunk
        head, sep, rest = data.partition(b"\r\n\r\n")
        if sep:
            length = next(
                (int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                 if line.lower().startswith(b"content-length:")),
                None,
            )  # fmt: skip
            if length is not None and len(rest) >= length:
                sock.settimeout(2.0)  # the answer is complete: does the server hang up?
                try:
                    closed = sock.recv(1) == b""
                except (TimeoutError, ConnectionResetError):
                    closed = False
                break
    status = int(data.split(b" ", 2)[1]) if data else 0
    return status, data.partition(b"\r\n\r\n")[2], closed


def _head(delivery: Delivery, framing: str) -> bytes:
    lines = [
        f"POST {WEBHOOK_PATH} HTTP/1.1",
        "host: 127.0.0.1",
        *(f"{name}: {value}" for name, value in delivery.headers.items()),
        framing,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_a_64_mib_content_length_is_refused_before_the_body_is_read(
    receiver: Receiver, prefect_api: str, spec: dict[str, object]
) -> None:
    delivery = signed(spec)
    memory_before = receiver.memory_kib()
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(_head(delivery, f"content-length: {HUGE}"))  # and not one byte of body
        status, body, closed = _read_response(sock)
        took = time.monotonic() - started
    memory_after = receiver.memory_kib()
    growth = memory_after["VmRSS"] - memory_before["VmRSS"]
    peak_growth = memory_after["VmHWM"] - memory_before["VmHWM"]
    report(
        "64 MiB Content-Length, no body sent",
        status=status,
        answer_s=f"{took:.4f}",
        rss_kib=f"{memory_before['VmRSS']}->{memory_after['VmRSS']} (+{growth})",
        peak_rss_growth_kib=peak_growth,
        closed=closed,
    )
    # Had the receiver waited for the body, it would not have answered at all.
    assert status == 413, body
    assert "limit" in json.loads(body)["error"]
    assert took < MAX_ANSWER_S
    assert closed, "the connection must be closed: its announced body is never read"
    assert growth < MAX_RSS_GROWTH_KIB and peak_growth < MAX_RSS_GROWTH_KIB
    assert runs_with_key(prefect_api, delivery.delivery) == []


def _send_chunks(sock: socket.socket, total: int, sent: list[int]) -> None:
    """`total` bytes of chunked body, 64 KiB a chunk, until the server stops listening."""
    chunk = b"x" * 65536
    frame = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
    try:
        while sent[0] < total:
            sock.sendall(frame)
            sent[0] += len(chunk)
        sock.sendall(b"0\r\n\r\n")
    except OSError:
        pass  # the receiver hung up: what this test wants


@pytest.mark.parametrize(
    ("case", "framing"),
    [
        ("64 MiB Content-Length, body sent", f"content-length: {HUGE}"),
        ("64 MiB chunked, no Content-Length", "transfer-encoding: chunked"),
    ],
)
def test_an_oversized_body_being_sent_is_cut_off_at_the_limit(
    receiver: Receiver, prefect_api: str, spec: dict[str, object], case: str, framing: str
) -> None:
    delivery = signed(spec)
    chunked = "chunked" in framing
    memory_before = receiver.memory_kib()
    sent = [0]
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 256 * 1024)
        started = time.monotonic()
        sock.sendall(_head(delivery, framing))
        if chunked:
            sender = threading.Thread(target=_send_chunks, args=(sock, HUGE, sent), daemon=True)
        else:
            sender = threading.Thread(target=_send_raw, args=(sock, HUGE, sent), daemon=True)
        sender.start()
        status, body, _ = _read_response(sock)
        took = time.monotonic() - started
        with contextlib.suppress(OSError):  # the receiver may have hung up already
            sock.shutdown(socket.SHUT_RDWR)
        sender.join(10)
    memory_after = receiver.memory_kib()
    growth = memory_after["VmRSS"] - memory_before["VmRSS"]
    peak_growth = memory_after["VmHWM"] - memory_before["VmHWM"]
    report(
        case,
        status=status,
        answer_s=f"{took:.4f}",
        client_sent_mib=f"{sent[0] / 2**20:.2f}",
        rss_kib=f"{memory_before['VmRSS']}->{memory_after['VmRSS']} (+{growth})",
        peak_rss_growth_kib=peak_growth,
    )
    assert status == 413, body
    assert took < MAX_ANSWER_S
    assert sent[0] < HUGE, "the receiver must stop listening long before 64 MiB"
    assert growth < MAX_RSS_GROWTH_KIB and peak_growth < MAX_RSS_GROWTH_KIB
    assert runs_with_key(prefect_api, delivery.delivery) == []


def _send_raw(sock: socket.socket, total: int, sent: list[int]) -> None:
    block = b"x" * 65536
    try:
        while sent[0] < total:
            sock.sendall(block)
            sent[0] += len(block)
    except OSError:
        pass


def test_a_chunked_body_just_over_the_limit_is_refused_and_one_at_the_limit_is_read(
    receiver: Receiver, spec: dict[str, object]
) -> None:
    """The cap is exact: a delivery of exactly the limit is read (and judged on its signature)."""

    def chunks(size: int) -> Iterator[bytes]:
        for start in range(0, size, 65536):
            yield b" " * min(65536, size - start)

    over = signed(spec)
    answer = httpx.post(receiver.url + WEBHOOK_PATH, content=chunks(LIMIT + 1),
                        headers=over.headers, timeout=30)  # fmt: skip
    assert answer.status_code == 413
    at_limit = httpx.post(receiver.url + WEBHOOK_PATH, content=chunks(LIMIT),
                          headers=over.headers, timeout=30)  # fmt: skip
    assert at_limit.status_code == 401  # read in full, and not the body that was signed


@pytest.mark.parametrize("name", ["../../etc/passwd", "/abs", "/etc/passwd", "default.yaml"])
def test_a_policy_name_that_is_a_path_is_a_422_that_does_not_echo_it(
    receiver: Receiver, prefect_api: str, spec: dict[str, object], name: str
) -> None:
    delivery = signed({**spec, "policy": name})
    answer = post(receiver, delivery)
    assert answer.status_code == 422, answer.text
    assert "^[a-z0-9_-]+$" in answer.json()["error"]
    assert name not in answer.text and name.strip("/.") not in answer.text
    assert runs_with_key(prefect_api, delivery.delivery) == []


def test_a_bad_spec_is_a_422_that_names_the_field_and_echoes_nothing(
    receiver: Receiver, prefect_api: str, spec: dict[str, object]
) -> None:
    planted = "PLANTED-<script>alert(1)</script>"
    bad = {**spec, "service": planted, "canary": {"steps": [{"weight": planted}]}, planted: 1}
    delivery = signed(bad)
    answer = post(receiver, delivery)
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert "canary.steps.0.weight" in error and "[float_parsing]" in error
    assert "unknown field" in error
    assert planted not in answer.text and "PLANTED" not in answer.text
    assert runs_with_key(prefect_api, delivery.delivery) == []
