"""A throwaway CA and a loopback server certificate it signs, made per test session, and the
sandbox served with them as a secured provider.

Real TLS without committed keys: the client trusts only this CA (a `ca_bundle`), so a test also
shows that the system's CAs are not what let the connection through.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import ssl
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from canaryflow.local.processes import ManagedProcess, free_port

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Certificates:
    ca: Path  # PEM of the CA: the client's ca_bundle
    cert: Path  # the server's certificate, for 127.0.0.1 and localhost
    key: Path  # its private key, 0600


def make_certificates(folder: Path, hosts: Sequence[str] = ()) -> Certificates:
    """A CA, and a server certificate it signs for 127.0.0.1, localhost and `hosts`."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "canaryflow test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        *(x509.DNSName(host) for host in hosts),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    paths = Certificates(
        ca=folder / "ca.pem", cert=folder / "server.pem", key=folder / "server.key"
    )
    paths.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths.key.touch(mode=0o600)
    paths.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


@dataclass(frozen=True)
class SecuredSandbox:
    url: str  # https://127.0.0.1:PORT
    certs: Certificates
    log: Path
    process: ManagedProcess


def answers_over_tls(url: str, ca: Path) -> bool:
    try:
        context = ssl.create_default_context(cafile=str(ca))
        return httpx.get(f"{url}/health", verify=context, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def secured_sandbox(
    folder: Path, key_var: str, key: str, log_level: str = "info", hosts: Sequence[str] = ()
) -> Iterator[SecuredSandbox]:
    """The sandbox as a secured provider: HTTPS with a certificate of a fresh CA, and a key it
    requires, read from `key_var` in its own environment (never its command line). At `info`
    its log has a line per request; under sustained load, `warning` keeps it lighter. Its
    certificate also names `hosts` (a name a proxy resolves, say)."""
    certs = make_certificates(folder / "certs", hosts)
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    log = folder / "sandbox.log"
    process = ManagedProcess(
        name="sandbox-tls",
        command=[
            sys.executable, "-m", "canaryflow.sandbox", "--port", str(port),
            "--tls-cert", str(certs.cert), "--tls-key", str(certs.key),
            "--require-key", key_var, "--log-level", log_level,
        ],
        log_path=log,
        ready=lambda: answers_over_tls(url, certs.ca),
        env={"PYTHONPATH": str(ROOT), key_var: key},
        cwd=ROOT,
    )  # fmt: skip
    process.start(timeout_s=30)
    try:
        yield SecuredSandbox(url, certs, log, process)
    finally:
        process.stop()
