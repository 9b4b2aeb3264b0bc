"""The model service (`canaryflow serve`): OpenAI-compatible, version and role aware.

Envoy tells each request which version and role it serves (`x-canaryflow-role`,
`x-canaryflow-version`; a mirrored copy carries `x-canaryflow-mirror: 1`, which only Envoy can
set, and takes its version from `x-canaryflow-shadow-version`). The service applies that
version's template and decoding parameters, calls the provider, and answers. Everything else
(PII masking, the live quality checkers, storing the record) happens in a background worker,
so the user only ever waits for the provider. The public port serves the OpenAI routes only;
warm-up and metrics are on the admin app (`admin.py`), bodies are bounded (`public.py`).
Shadow requests are dry runs: they never execute a tool, and they use their own connection pool
and a tight timeout so they cannot slow the user's path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from canaryflow.contracts import DEFAULT_CHECKERS, CheckerConfig, ProvidersFile, Role
from canaryflow.dataplane.admin import admin_app
from canaryflow.dataplane.envoy_config import DEFAULT_MAX_REQUEST_BYTES, MIRROR_HEADER
from canaryflow.dataplane.feedback import (
    FEEDBACK_PATH,
    FeedbackRoute,
    feedback_config,
    pipeline_checkers,
)
from canaryflow.dataplane.forwarder import (
    Forwarder,
    ForwarderKind,
    Plan,
    ServiceError,
    Upstreams,
    make_forwarder,
    parse_body,
    plan_for,
    provider_error,
    provider_payload,
    wants_usage,
)
from canaryflow.dataplane.metrics import ServiceMetrics
from canaryflow.dataplane.probes import PROBE_HEADER, ProbeScorer, probe_suites
from canaryflow.dataplane.public import HotPath, read_body, refuse_too_large
from canaryflow.dataplane.recording import Pending, RecordWorker, StoreLike
from canaryflow.dataplane.resolver import CachedResolver, default_resolver
from canaryflow.dataplane.streaming import StreamCall, relay_stream
from canaryflow.errors import ConfigError, RegistryError, TransientProviderError
from canaryflow.providers.config import from_urls

log = logging.getLogger("canaryflow.serve")
CHAMPION = "champion"
_ROLES = {r.value: r for r in Role}


@dataclass(frozen=True)
class ServiceConfig:
    """What one model-service process serves and where it sends things."""

    service: str
    provider_urls: Mapping[str, str]
    """name -> bare URL of a provider without a key (`--provider-url`, the sandbox)."""
    providers: ProvidersFile | None = None
    """The providers file (`--providers`): base URL, key by reference, TLS; wins over
    `provider_urls` for a name in both."""
    registry_uri: str | None = None
    store: str | None = None
    default_version: str | None = None
    checkers: tuple[CheckerConfig, ...] | None = None
    """The live checkers of its answers (`serve --policy`: the policy's `checkers`), reaching
    their providers through the same entries as the forwarders; a checker whose provider is
    missing is refused at start. None: `DEFAULT_CHECKERS`, less those whose provider (the
    stack's `sandbox`) this service does not have (a warning names them)."""
    check_sample: float = 1.0
    """Scales every checker's sample rate (`serve --check-sample`, kept for older scripts);
    0 runs no checker."""
    tool_urls: Mapping[str, str] = field(default_factory=dict)
    forwarder: ForwarderKind = "http1"
    timeout_s: float = 30.0
    shadow_timeout_s: float = 5.0
    tool_timeout_s: float = 5.0
    registry_ttl_s: float = 30.0
    queue_size: int = 10_000
    flush_every_s: float = 0.2
    warmup_s: float = 15.0
    warm_connections: int = 16
    """Connections opened to a version's provider on each pool when it is warmed."""
    manifests: Mapping[str, Path] = field(default_factory=dict)
    """version -> manifest file served without a registry (local runs, benchmarks)."""
    user_salt: Path | None = None
    """File with the salt user ids are hashed with (made 0600 if missing); None: the store's
    default (`user-salt` beside a SQLite file; a PostgreSQL store needs one)."""
    keys_dir: Path | None = None
    """Trusted keys: a registry manifest is served only once its signature verifies with one
    bound to the service. None: no registry manifest is served."""
    check_queue_size: int = 1000
    """Each checker's queue; an answer offered to a full one is dropped (counted), its record
    written unchecked at once."""
    max_body_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    """Bigger request bodies are refused 413 (Envoy refuses them first; this guards direct
    callers and a misconfigured edge)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.check_sample <= 1.0:
            raise ConfigError(f"check_sample must be in [0, 1], got {self.check_sample}")


class ModelService:
    def __init__(
        self,
        config: ServiceConfig,
        resolver: CachedResolver,
        metrics: ServiceMetrics,
        worker: RecordWorker,
    ) -> None:
        self.config = config
        self.resolver = resolver
        self.metrics = metrics
        self.worker = worker
        self.forwarder: Forwarder = make_forwarder(config.forwarder)
        self.shadow_forwarder: Forwarder = make_forwarder(config.forwarder)
        self.ready = False
        self._plans: dict[str, Plan] = {}
        self.upstreams = Upstreams(all_providers(config).providers)

    # ------------------------------------------------------------------ routing

    async def route(self, headers: Mapping[str, str]) -> tuple[Role, str]:
        """Role and version of a request, from Envoy's headers (see the module docstring).

        A mirrored copy is known by the header Envoy alone sets; a `-shadow` Host without it
        is refused rather than guessed at (Envoy rewrites the Host of every primary copy).
        """
        mirrored = headers.get(MIRROR_HEADER) == "1"
        if not mirrored and headers.get("host", "").endswith("-shadow"):
            raise ServiceError(
                400, f"a -shadow Host without {MIRROR_HEADER}: 1 (set by Envoy)", "invalid_request"
            )
        if mirrored:
            version = headers.get("x-canaryflow-shadow-version")
            if not version:
                raise ServiceError(
                    400, "mirrored request without x-canaryflow-shadow-version", "invalid_request"
                )
            return Role.SHADOW, version
        role_name = headers.get("x-canaryflow-role")
        role = Role.STABLE
        if role_name is not None:
            found = _ROLES.get(role_name)
            if found is None:
                raise ServiceError(
                    400,
                    f"x-canaryflow-role must be one of {sorted(_ROLES)}, got {role_name!r}",
                    "invalid_request",
                )
            role = found
        version = headers.get("x-canaryflow-version") or await self.default_version()
        return role, version

    async def default_version(self) -> str:
        if self.config.default_version:
            return self.config.default_version
        try:
            return await self.resolver.version_of(self.config.service, CHAMPION)
        except RegistryError as exc:
            raise ServiceError(503, str(exc), "version_unavailable") from exc

    async def plan(self, version: str) -> Plan:
        try:
            manifest = await self.resolver.manifest(self.config.service, version)
        except RegistryError as exc:
            raise ServiceError(503, str(exc), "version_unavailable") from exc
        plan = self._plans.get(version)
        if plan is None or plan.manifest is not manifest:
            upstream = self.upstreams.get(manifest.origin.provider)
            plan = self._plans[version] = plan_for(manifest, upstream)
        return plan

    async def warm(self, version: str) -> Plan:
        """Ready `version` before traffic moves to it: resolve its manifest and open
        connections to its provider on both pools, so its first users (and the first
        shadow window's tail) pay neither the registry nor TCP and TLS handshakes. A provider
        that refuses connections now is left to the requests to report."""
        plan = await self.plan(version)
        upstream = plan.upstream
        count = self.config.warm_connections
        for forwarder in (self.forwarder, self.shadow_forwarder):
            with contextlib.suppress(OSError, TimeoutError, ConfigError):
                await forwarder.preconnect(upstream.url, count, upstream.headers, upstream.tls)
        return plan

    # ------------------------------------------------------------------ the request

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """`POST /v1/chat/completions` as a bare ASGI app.

        The hot path skips Starlette's router, middleware and Request/Response objects: at
        1,500 req/s with a mirror every microsecond is paid twice, once per service.
        """
        raw_body = await read_body(scope, receive, self.config.max_body_bytes)
        if raw_body is None:
            await refuse_too_large(send, self.config.max_body_bytes)
            return
        # ASGI header names are lowercase; one pass instead of a scan per lookup.
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        status, out, body = await self.chat(headers, raw_body, receive, send)
        if body is None:  # streamed: sent already
            return
        raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in out.items()]
        raw += [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})

    async def chat(
        self, headers: Mapping[str, str], raw_body: bytes, receive: Receive, send: Send
    ) -> tuple[int, dict[str, str], bytes | None]:
        """Answer one request: status, response headers, JSON body (None: it was streamed
        to `send` as it came)."""
        started = time.perf_counter()
        request_id = headers.get("x-request-id") or f"{random.getrandbits(128):032x}"
        out = {"x-request-id": request_id}
        pending = Pending(request_id, time.time(), headers.get("x-canaryflow-user"))
        pending.synthetic = headers.get("x-canaryflow-synthetic") == "1"  # set by Envoy only
        if pending.synthetic:  # a probe's item is honoured on synthetic requests alone
            pending.probe = headers.get(PROBE_HEADER)
        try:
            role, version = await self.route(headers)
            pending.role, pending.version = role, version
            out["x-canaryflow-role"], out["x-canaryflow-version"] = role.value, version
            body = parse_body(raw_body)
            pending.body = body  # a reference for the checkers' context, never a copy
            plan = await self.plan(version)
            payload, pending.prompt = provider_payload(plan, body)
            answer: bytes | None
            if body.get("stream") is True:
                call = self._stream_call(plan, role, payload, wants_usage(body), started)
                calls = await relay_stream(call, pending, out, receive, send)
                answer = None
                if calls:
                    await self._tools(calls, pending)  # the headers are gone: metrics only
            else:
                answer = await self._call(plan, role, payload, pending, out)
        except ServiceError as exc:
            pending.status = exc.status
            answer = exc.body(out)
        except Exception as exc:  # a bug: still answered, counted and recorded
            log.exception("request %s failed", request_id)
            pending.status = 500
            answer = ServiceError(500, f"internal error: {exc!r}", "internal_error").body(out)
        latency = time.perf_counter() - started
        pending.latency_ms = latency * 1000
        # A record's time is its completion: a request slower than a window (a hang, a provider
        # timeout answered 504) counts in the window it ended in, never in one already judged.
        pending.at = time.time()
        self.metrics.observe_request(
            pending.version,
            pending.role.value,
            pending.status,
            latency,
            pending.tokens_in,
            pending.tokens_out,
            pending.cost_usd,
            synthetic=pending.synthetic,
        )
        self.worker.submit(pending)
        return pending.status, out, answer

    def _stream_call(
        self, plan: Plan, role: Role, payload: bytes, pass_usage: bool, started: float
    ) -> StreamCall:
        """A shadow consumes its own stream (Envoy drops what it answers), on its own pool."""
        shadow = role is Role.SHADOW
        return StreamCall(
            forwarder=self.shadow_forwarder if shadow else self.forwarder,
            upstream=plan.upstream,
            payload=payload,
            timeout_s=plan.upstream.timeout(
                self.config.shadow_timeout_s if shadow else self.config.timeout_s
            ),
            pass_usage=pass_usage,
            price=plan.manifest.price,
            started=started,
        )

    async def _call(
        self, plan: Plan, role: Role, payload: bytes, pending: Pending, out: dict[str, str]
    ) -> bytes:
        shadow = role is Role.SHADOW
        forwarder = self.shadow_forwarder if shadow else self.forwarder
        upstream = plan.upstream
        timeout = upstream.timeout(
            self.config.shadow_timeout_s if shadow else self.config.timeout_s
        )
        try:
            with upstream.admission():
                reply = await forwarder.post(
                    upstream.url, payload, timeout, upstream.headers, upstream.tls
                )
        except TransientProviderError as exc:
            raise ServiceError(502, str(exc), "provider_unavailable") from exc
        if reply.status != 200:
            raise provider_error(reply.status, reply.body, reply.retry_after, upstream)
        try:
            answer = json.loads(reply.body)
            message = answer["choices"][0]["message"]
        except (ValueError, LookupError, TypeError) as exc:
            raise ServiceError(
                502, f"provider answered 200 with no usable completion: {exc}", "provider_error"
            ) from exc
        usage = answer.get("usage") or {}
        pending.tokens_in = int(usage.get("prompt_tokens") or 0)
        pending.tokens_out = int(usage.get("completion_tokens") or 0)
        pending.cost_usd = plan.manifest.price.cost(pending.tokens_in, pending.tokens_out)
        pending.status = 200
        tool_calls = message.get("tool_calls")
        pending.response = message.get("content") or (json.dumps(tool_calls) if tool_calls else "")
        if tool_calls:
            out["x-canaryflow-tool-calls"] = await self._tools(tool_calls, pending)
        return reply.body

    async def _tools(self, calls: list[dict[str, Any]], pending: Pending) -> str:
        """Execute side-effecting tools for stable/canary; a shadow only counts what it skipped."""
        done = []
        for call in calls:
            function = call.get("function") or {}
            name = str(function.get("name", ""))
            url = self.config.tool_urls.get(name)
            if url is None:
                action, name = "unconfigured", "other"  # bounded label values
            elif pending.role is Role.SHADOW:
                action = "skipped"
            else:
                arguments = function.get("arguments") or "{}"
                if not isinstance(arguments, str):
                    arguments = json.dumps(arguments)
                try:
                    result = await self.forwarder.post(
                        url, arguments.encode(), self.config.tool_timeout_s
                    )
                    action = "executed" if result.status < 300 else "failed"
                except TransientProviderError:
                    action = "failed"
            self.metrics.observe_tool_call(pending.version, pending.role.value, name, action)
            done.append(f"{name}:{action}")
        return ",".join(done)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self.forwarder.start()
        await self.shadow_forwarder.start()
        self.worker.start()
        # Warm the cache so the first user does not pay for the registry (the first MLflow
        # call imports mlflow: seconds). Not fatal: after the deadline the service is ready
        # anyway and answers 503 for what it cannot resolve.
        deadline = time.monotonic() + self.config.warmup_s
        while True:
            try:
                await self.warm(await self.default_version())
                break
            except ServiceError as exc:
                if exc.kind == "provider_not_configured":  # waiting cannot fix the file or env
                    log.error("%s", exc.message)  # names the variable or file, never the key
                if exc.kind == "provider_not_configured" or time.monotonic() >= deadline:
                    break
                await asyncio.sleep(0.2)
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        await self.worker.aclose()
        await self.resolver.aclose()
        await self.forwarder.aclose()
        await self.shadow_forwarder.aclose()


def build_app(
    config: ServiceConfig,
    *,
    resolver: CachedResolver | None = None,
    store: StoreLike | None = None,
    registry: CollectorRegistry | None = None,
) -> HotPath:
    """The public ASGI app, its admin app as `.admin`. Pass `resolver` (with your own `fetch`)
    and `store` to run without MLflow."""
    metrics = ServiceMetrics(config.service, registry)
    if resolver is None:
        resolver = _default_resolver(config)
    resolver.on_error = lambda exc: metrics.registry_error()
    owned_store = None
    if store is None and config.store is not None:
        from canaryflow.dataplane.store import Store

        store = owned_store = Store(config.store, salt_path=config.user_salt)
    salt = None
    if config.user_salt is not None:
        from canaryflow.dataplane.store import load_salt

        salt = load_salt(config.user_salt)
    worker = RecordWorker(
        config.service,
        metrics,
        store,
        config.check_sample,
        config.queue_size,
        config.flush_every_s,
        salt=salt,
        checkers=pipeline_checkers(live_checkers(config)),
        providers=all_providers(config),
        check_queue_size=config.check_queue_size,
        probes=ProbeScorer(probe_suites(config.checkers)),
    )
    service = ModelService(config, resolver, metrics, worker)

    async def health(request: Request) -> Response:
        status = 200 if service.ready else 503
        return JSONResponse({"ready": service.ready, "service": config.service}, status_code=status)

    async def models(request: Request) -> Response:
        versions = resolver.cached_versions(config.service)
        data = [
            {"id": f"{config.service}@{v}", "object": "model", "owned_by": "canaryflow"}
            for v in versions
        ]
        return JSONResponse({"object": "list", "data": data})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()
            if owned_store is not None:
                owned_store.close()

    feedback = FeedbackRoute(
        config.service,
        store,
        metrics,
        feedback_config(config.checkers or ()),
        config.max_body_bytes,
    )
    # The public listener has the OpenAI routes and /health only; the rest is `admin`'s.
    app = Starlette(
        routes=[
            Route("/health", health),
            Route("/v1/models", models),
            Route(FEEDBACK_PATH, feedback, methods=["POST"]),
        ],
        lifespan=lifespan,
    )
    return HotPath(service, app, admin_app(service))


def all_providers(config: ServiceConfig) -> ProvidersFile:
    """The bare `--provider-url` entries and the providers file's (which win): what the
    forwarders and the live checkers reach."""
    return ProvidersFile(
        providers={
            **from_urls(config.provider_urls).providers,
            **(config.providers.providers if config.providers else {}),
        }
    )


def live_checkers(config: ServiceConfig) -> tuple[CheckerConfig, ...]:
    """The checkers a service runs: its own, else the defaults it has the providers for."""
    if config.checkers is not None:
        return config.checkers
    known = all_providers(config).providers
    kept = tuple(c for c in DEFAULT_CHECKERS if getattr(c, "provider", None) in (None, *known))
    for checker in DEFAULT_CHECKERS:
        if checker not in kept:
            log.warning(
                "the default checker %s calls provider %r, which this service does not have: "
                "not run; give the service a policy naming your judge (serve --policy)",
                checker.label,
                getattr(checker, "provider", None),
            )
    return kept


def _default_resolver(config: ServiceConfig) -> CachedResolver:
    return default_resolver(
        config.registry_uri, config.manifests, config.registry_ttl_s, config.keys_dir
    )
