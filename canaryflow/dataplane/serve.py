"""`canaryflow serve`: run one model-service process under uvicorn.

Kept apart from `service.py` so the app can be built and tested without the command line. One
uvicorn server listens on two sockets: the public port (OpenAI routes) and the admin port
(warm-up, metrics; loopback unless told otherwise); with `--uds PATH`, on a third: the public
routes again on a Unix socket, for Envoy in front of the service on the same machine (a Unix
socket costs Envoy and the service less CPU per request than loopback TCP). The socket file is
made owner-only (0600) in a folder only its owner may enter (0700).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import os
import socket
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from canaryflow.dataplane.envoy_config import DEFAULT_MAX_REQUEST_BYTES
from canaryflow.dataplane.logs import configure_logging
from canaryflow.dataplane.public import HotPath, Listeners
from canaryflow.dataplane.service import ServiceConfig, build_app
from canaryflow.dataplane.socket_listener import serve_unix_socket
from canaryflow.errors import ConfigError
from canaryflow.loading import load_policy
from canaryflow.providers.config import load_providers


def _pairs(values: Sequence[str], flag: str) -> dict[str, str]:
    found = {}
    for value in values:
        key, sep, url = value.partition("=")
        if not sep or not key or not url:
            raise ConfigError(f"{flag} expects NAME=VALUE, got {value!r}")
        found[key] = url
    return found


@dataclass(frozen=True)
class Addresses:
    host: str
    port: int
    admin_host: str
    admin_port: int
    uds: Path | None = None


def parse_args(argv: Sequence[str] | None = None) -> tuple[ServiceConfig, Addresses]:
    p = argparse.ArgumentParser(prog="canaryflow serve", description="Run a model service.")
    p.add_argument("--service", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True, help="public port: OpenAI routes only")
    p.add_argument(
        "--admin-port",
        type=int,
        required=True,
        help="port of /admin/warm, /metrics and /health (Prometheus and warm-up use it)",
    )
    p.add_argument("--admin-host", default="127.0.0.1", help="keep it off public interfaces")
    p.add_argument(
        "--uds",
        metavar="PATH",
        help="also serve the public routes on a Unix socket at PATH (made 0600; its folder is "
        "made 0700 if missing and must not be writable by others): Envoy's way in",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help="bigger request bodies are answered 413 (default: %(default)s)",
    )
    p.add_argument("--registry-uri", help="MLflow tracking URI of the model registry")
    p.add_argument(
        "--keys-dir",
        metavar="DIR",
        help="trusted keys (.pub, each with its .services binding): a registry manifest is "
        "served only once its signature verifies; without it, none is",
    )
    p.add_argument(
        "--manifest",
        action="append",
        default=[],
        metavar="VERSION=PATH",
        help="serve VERSION from a manifest file (before asking the registry)",
    )
    p.add_argument(
        "--provider-url",
        action="append",
        default=[],
        metavar="NAME=URL",
        help="a provider without a key (the sandbox); --providers for the rest",
    )
    p.add_argument(
        "--providers",
        metavar="FILE",
        help="providers file: base URL, key by reference (api_key_env / api_key_file), CA "
        "bundle; the key is read at start-up and for each new version, never logged",
    )
    p.add_argument("--store", help="SQLite path or database URL for request records")
    p.add_argument(
        "--user-salt",
        metavar="PATH",
        help="file with the salt user ids are hashed with, made owner-only if missing "
        "(default: user-salt beside a SQLite store; needed with PostgreSQL)",
    )
    p.add_argument("--default-version", help="version for requests without role headers")
    p.add_argument(
        "--policy",
        metavar="FILE",
        help="gate policy (YAML/JSON) whose `checkers` judge this service's answers; only that "
        "part is read (default: the built-in checkers, as deployments/policies/default.yaml)",
    )
    p.add_argument(
        "--check-sample",
        type=float,
        default=1.0,
        help="deprecated: multiplies every checker's sample rate (0: no checks); set rates in "
        "the policy's checkers instead",
    )
    p.add_argument("--tool-url", action="append", default=[], metavar="TOOL=URL")
    p.add_argument("--forwarder", choices=["http1", "aiohttp", "httpx"], default="http1")
    p.add_argument("--timeout", type=float, default=30.0, help="provider timeout, seconds")
    p.add_argument("--shadow-timeout", type=float, default=5.0)
    a = p.parse_args(argv)
    config = ServiceConfig(
        service=a.service,
        provider_urls=_pairs(a.provider_url, "--provider-url"),
        providers=load_providers(Path(a.providers)) if a.providers else None,
        registry_uri=a.registry_uri,
        store=a.store,
        default_version=a.default_version,
        checkers=load_policy(Path(a.policy)).checkers if a.policy else None,
        check_sample=a.check_sample,
        tool_urls=_pairs(a.tool_url, "--tool-url"),
        forwarder=a.forwarder,
        timeout_s=a.timeout,
        shadow_timeout_s=a.shadow_timeout,
        manifests={v: Path(p) for v, p in _pairs(a.manifest, "--manifest").items()},
        user_salt=Path(a.user_salt) if a.user_salt else None,
        keys_dir=Path(a.keys_dir) if a.keys_dir else None,
        max_body_bytes=a.max_body_bytes,
    )
    if a.max_body_bytes < 1:
        raise ConfigError(f"--max-body-bytes must be at least 1, got {a.max_body_bytes}")
    if a.admin_port == a.port:
        raise ConfigError("--admin-port must differ from --port: the admin routes stay private")
    uds = Path(a.uds) if a.uds else None
    return config, Addresses(a.host, a.port, a.admin_host, a.admin_port, uds)


def bind(host: str, port: int) -> socket.socket:
    """A bound socket for uvicorn to listen on (it takes a list; Config takes one address)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.set_inheritable(True)
    return sock


def bind_unix(path: Path) -> socket.socket:
    """A Unix socket at `path`, owner-only: its folder is made 0700 if missing and refused if
    others may write to it (they could swap the socket file for their own); a stale socket file
    from an earlier run is replaced, anything else at `path` is refused."""
    if len(os.fsencode(path)) > 107:  # sun_path: 108 bytes with the final NUL
        raise ConfigError(f"--uds: {path} is too long for a Unix socket address (> 107 bytes)")
    folder = path.parent
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if folder.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(f"--uds: {folder} is writable by others; use a folder only you can write")
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise ConfigError(f"--uds: {path} exists and is not a socket; refusing to replace it")
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # created 0600: no window in which others could connect
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.set_inheritable(True)
    return sock


class Server(uvicorn.Server):
    """uvicorn for the TCP listeners; the Unix socket (`--uds`) served by the lean protocol of
    `socket_listener.py` once the app has started, inside uvicorn's graceful shutdown."""

    def __init__(
        self,
        config: uvicorn.Config,
        *,
        unix: socket.socket | None,
        public: HotPath,
        max_body_bytes: int,
    ) -> None:
        super().__init__(config)
        self.unix, self.public, self.max_body_bytes = unix, public, max_body_bytes
        self.unix_path = Path(unix.getsockname()) if unix is not None else None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.should_exit or self.unix is None:
            return
        listener = await serve_unix_socket(
            self.public, self.unix, self.server_state, self.max_body_bytes
        )
        self.servers.append(listener)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets)
        # Here, not after run(): uvicorn ends the process by re-raising the signal it caught.
        if self.unix_path is not None:
            with contextlib.suppress(OSError):
                self.unix_path.unlink()


def main(argv: Sequence[str] | None = None) -> None:
    config, at = parse_args(argv)
    # The resolver caches and retries on its own; MLflow's client would retry for minutes.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    fast = importlib.util.find_spec("uvloop") and importlib.util.find_spec("httptools")
    sockets = [bind(at.host, at.port), bind(at.admin_host, at.admin_port)]
    # What start-up made lives as long as the process: out of the collector's sight (freeze),
    # and the youngest generation collected every 20,000 allocations instead of 700. The
    # request path allocates many short-lived containers and makes few cycles; measured ~5-10%
    # less CPU per request (benchmarks/bench_dataplane.py, service direct).
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    app = Listeners(build_app(config), at.admin_port)
    server = Server(
        uvicorn.Config(
            app,
            loop="uvloop" if fast else "asyncio",
            http="httptools" if fast else "h11",
            access_log=False,
            log_level="warning",
            # No peer is trusted to name the client (no X-Forwarded-* rewriting per request);
            # no Server header naming the software.
            proxy_headers=False,
            server_header=False,
            workers=1,
        ),
        unix=bind_unix(at.uds) if at.uds is not None else None,
        public=app.public,
        max_body_bytes=config.max_body_bytes,
    )
    configure_logging(config.service)  # CANARYFLOW_LOG_FORMAT=json: JSON lines; else unchanged
    server.run(sockets=sockets)


if __name__ == "__main__":
    main()
