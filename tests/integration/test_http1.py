"""The lean provider client against a real TCP server that misbehaves on request.

The server is a raw asyncio protocol (not a framework) so each test can choose exactly what goes
on the wire: chunked bodies, bodies delimited by closing, idle connections dropped, garbage.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from canaryflow.dataplane.forwarder import ForwarderKind, make_forwarder
from canaryflow.dataplane.http1 import Http1Client
from canaryflow.errors import ConfigError, TransientProviderError
from tests.waiting import async_wait_for

BODY = b'{"choices": [{"message": {"content": "Paris"}}]}'


def _answer(path: bytes) -> tuple[bytes, bool]:
    """Bytes to send for `path`, and whether to close the connection afterwards."""
    if path == b"/ok":
        return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(BODY), BODY), False
    if path == b"/chunked":
        half = len(BODY) // 2
        chunks = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (half, BODY[:half], len(BODY) - half,
                                                        BODY[half:])  # fmt: skip
        return b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunks, False
    if path == b"/until-close":
        return b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n" + BODY, True
    if path == b"/continue":
        ok = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(BODY), BODY)
        return b"HTTP/1.1 100 Continue\r\n\r\n" + ok, False
    if path == b"/limited":
        return (
            b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 7\r\ncontent-length: 2\r\n\r\n{}",
            False,
        )
    if path == b"/garbage":
        return b"NOT HTTP AT ALL\r\n\r\n", True
    if path == b"/drop-later":  # answers, then drops the idle connection (see data_received)
        return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(BODY), BODY), True
    return b"", False  # /silent: never answers


class _Server(asyncio.Protocol):
    def __init__(self, owner: RawServer) -> None:
        self.owner, self.buffer = owner, b""
        self.hang_up_next = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.owner.connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.closed += 1

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = self.buffer[:end].lower()
            length = next(int(line[15:]) for line in head.split(b"\r\n")
                          if line.startswith(b"content-length:"))  # fmt: skip
            if len(self.buffer) < end + 4 + length:
                return
            self.owner.bodies.append(self.buffer[end + 4 : end + 4 + length])
            self.buffer = self.buffer[end + 4 + length :]
            path = head.split(b" ")[1]
            if self.hang_up_next:  # the race keep-alive clients must survive
                self.transport.close()
                return
            self.hang_up_next = path == b"/hang-up-next"
            reply, close = _answer(b"/ok" if self.hang_up_next else path)
            self.transport.write(reply)  # type: ignore[attr-defined]
            if close and path == b"/drop-later":
                # Our FIN without a word; `closed` counts it once the client has seen the drop
                # and closed its side (our default eof_received closes the transport then).
                self.transport.write_eof()  # type: ignore[attr-defined]
            elif close:
                self.transport.close()


class RawServer:
    def __init__(self) -> None:
        self.connections = 0
        self.closed = 0
        self.bodies: list[bytes] = []
        self.port = 0


@pytest.fixture
async def server() -> AsyncIterator[RawServer]:
    raw = RawServer()
    listener = await asyncio.get_running_loop().create_server(lambda: _Server(raw), "127.0.0.1", 0)
    raw.port = listener.sockets[0].getsockname()[1]
    yield raw
    listener.close()


@pytest.fixture
async def client() -> AsyncIterator[Http1Client]:
    http = Http1Client()
    await http.start()
    yield http
    await http.aclose()


def url(server: RawServer, path: str) -> str:
    return f"http://127.0.0.1:{server.port}{path}"


async def test_keeps_one_connection_alive_across_calls(
    server: RawServer, client: Http1Client
) -> None:
    for i in range(5):
        reply = await client.post(url(server, "/ok"), b'{"n": %d}' % i, 5.0)
        assert (reply.status, reply.body) == (200, BODY)
    assert server.connections == 1
    assert server.bodies == [b'{"n": %d}' % i for i in range(5)]


async def test_concurrent_calls_open_their_own_connections(
    server: RawServer, client: Http1Client
) -> None:
    replies = await asyncio.gather(*(client.post(url(server, "/ok"), b"{}", 5.0) for _ in range(8)))
    assert all(r.body == BODY for r in replies)
    assert 1 < server.connections <= 8


async def test_preconnected_connections_serve_the_first_concurrent_calls(
    server: RawServer, client: Http1Client
) -> None:
    opened = await client.preconnect(url(server, "/ok"), 4)
    assert opened == 4
    await async_wait_for("4 connections", lambda: server.connections == 4, timeout_s=5)
    replies = await asyncio.gather(*(client.post(url(server, "/ok"), b"{}", 5) for _ in range(4)))
    assert [r.status for r in replies] == [200] * 4
    assert server.connections == 4  # no handshake on the request path
    assert await client.preconnect(url(server, "/ok"), 4) == 0  # already idle: nothing opened


async def test_chunked_and_close_delimited_bodies_are_read_whole(
    server: RawServer, client: Http1Client
) -> None:
    assert (await client.post(url(server, "/chunked"), b"{}", 5.0)).body == BODY
    assert (await client.post(url(server, "/until-close"), b"{}", 5.0)).body == BODY
    assert (await client.post(url(server, "/continue"), b"{}", 5.0)).body == BODY


async def test_rate_limit_answer_keeps_status_and_retry_after(
    server: RawServer, client: Http1Client
) -> None:
    reply = await client.post(url(server, "/limited"), b"{}", 5.0)
    assert (reply.status, reply.retry_after) == (429, "7")


async def test_connection_dropped_while_idle_is_replaced_without_an_error(
    server: RawServer, client: Http1Client
) -> None:
    await client.post(url(server, "/drop-later"), b"{}", 5.0)
    # The client has seen the drop and closed its end: the pooled connection is dead, not racing.
    await async_wait_for("both ends of the dropped connection closed", lambda: server.closed == 1)
    reply = await client.post(url(server, "/ok"), b"{}", 5.0)
    assert reply.body == BODY
    assert server.connections == 2


async def test_connection_closed_as_the_next_request_arrives_is_retried_once(
    server: RawServer, client: Http1Client
) -> None:
    await client.post(url(server, "/hang-up-next"), b"{}", 5.0)
    reply = await client.post(url(server, "/ok"), b"{}", 5.0)
    assert reply.body == BODY
    assert server.connections == 2


async def test_silent_provider_times_out_and_the_next_call_still_works(
    server: RawServer, client: Http1Client
) -> None:
    with pytest.raises(TransientProviderError, match=r"did not answer in 0\.2 s"):
        await client.post(url(server, "/silent"), b"{}", 0.2)
    # The abandoned connection is closed by the client (the server sees its end), not left open.
    await async_wait_for("the server to see the abandoned connection closed", lambda: server.closed)
    assert server.closed == 1
    assert (await client.post(url(server, "/ok"), b"{}", 5.0)).body == BODY
    assert server.connections == 2


async def test_garbage_and_refused_connections_are_transient_errors(
    server: RawServer, client: Http1Client
) -> None:
    with pytest.raises(TransientProviderError, match="malformed HTTP answer"):
        await client.post(url(server, "/garbage"), b"{}", 5.0)
    closed = RawServer()
    listener = await asyncio.get_running_loop().create_server(
        lambda: _Server(closed), "127.0.0.1", 0
    )
    port = listener.sockets[0].getsockname()[1]
    listener.close()
    await listener.wait_closed()
    with pytest.raises(TransientProviderError, match="unreachable"):
        await client.post(f"http://127.0.0.1:{port}/ok", b"{}", 5.0)


async def test_url_without_http_scheme_is_a_config_error(client: Http1Client) -> None:
    with pytest.raises(ConfigError, match=r"http\(s\)://host"):
        await client.post("ftp://example.invalid/x", b"{}", 1.0)


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now, hour = dt.datetime.now(dt.UTC), dt.timedelta(hours=1)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - hour).not_valid_after(now + hour)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    return cert_path, key_path


async def test_https_provider_is_called_over_verified_tls(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    raw = RawServer()
    listener = await asyncio.get_running_loop().create_server(
        lambda: _Server(raw), "127.0.0.1", 0, ssl=server_context
    )
    port = listener.sockets[0].getsockname()[1]
    try:
        trusting = Http1Client(ssl_context=ssl.create_default_context(cafile=str(cert)))
        reply = await trusting.post(f"https://localhost:{port}/ok", b"{}", 5.0)
        assert reply.body == BODY
        await trusting.aclose()
        default = Http1Client()  # the system's trust store does not know this certificate
        with pytest.raises(TransientProviderError, match="CERTIFICATE_VERIFY_FAILED"):
            await default.post(f"https://localhost:{port}/ok", b"{}", 5.0)
        await default.aclose()
    finally:
        listener.close()


@pytest.mark.parametrize("kind", ["http1", "aiohttp", "httpx"])
async def test_every_forwarder_keeps_the_same_contract(
    server: RawServer, kind: ForwarderKind
) -> None:
    """The benchmark swaps forwarders: each must map answers and failures alike."""
    forwarder = make_forwarder(kind)
    await forwarder.start()
    try:
        ok = await forwarder.post(url(server, "/ok"), b'{"x": 1}', 5.0)
        assert (ok.status, ok.body) == (200, BODY)
        limited = await forwarder.post(url(server, "/limited"), b"{}", 5.0)
        assert (limited.status, limited.retry_after) == (429, "7")
        with pytest.raises(TransientProviderError, match="did not answer"):
            await forwarder.post(url(server, "/silent"), b"{}", 0.2)
    finally:
        await forwarder.aclose()
    assert server.bodies[0] == b'{"x": 1}'
