"""The steps of a release, free of Prefect: what `tasks/` wrap and `flows/` compose.

Each function does one step of DESIGN.md's runbook against the real systems named in
`Endpoints` and returns plain data (contracts), so the same steps run from a Prefect flow, from
the CLI, or from a test.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from canaryflow import connections
from canaryflow.analysis.planning import ReleasePlan, adapted, plan_release
from canaryflow.contracts import (
    CompatibilityReport,
    Decision,
    Endpoints,
    EvalReport,
    GatePolicy,
    GateResult,
    Label,
    ModelManifest,
    OfflineGate,
    PolicyFloor,
    PublishedVersion,
    ReleaseSpec,
    Role,
    Routes,
    Severity,
    WindowResult,
    combine,
)
from canaryflow.errors import (
    AliasNotFound,
    BelowFloor,
    CompatibilityError,
    ConfigError,
    RollbackUnconfirmed,
    SpecError,
    StackError,
)
from canaryflow.floors import below_floor, beyond_silence, late_records_wait_s
from canaryflow.registry.artifacts import ArtifactDigest, verify_published
from canaryflow.registry.signing import load_trusted_keys, verify

if TYPE_CHECKING:
    from canaryflow.analysis.gates import GateMemory
    from canaryflow.analysis.late import LateLook
    from canaryflow.contracts import ProvidersFile
    from canaryflow.providers.preflight import ProviderCheck

# Records reach the store in batches, after they complete. A window is read once every record
# writer has stored what completed before its end (the watermark), or after this long: then the
# window is judged incomplete, which is never a pass.
WATERMARK_WAIT_S = 10.0
BARE_URLS = "the stack's provider_urls (no providers file given)"


@dataclass(frozen=True)
class Preflight:
    baseline: PublishedVersion
    compatibility: CompatibilityReport
    key_id: str
    provider: ProviderCheck | None = None
    plan: ReleasePlan | None = None  # None: too little recent traffic to plan with
    spec: ReleaseSpec | None = None  # the spec to run: windows lengthened by the plan, if allowed


def preflight(
    spec: ReleaseSpec,
    endpoints: Endpoints,
    floor: PolicyFloor,
    silence_within_s: float | None = None,
    providers: ProvidersFile | None = None,
) -> Preflight:
    """The floor, the windows against the silence automation (`silence_within_s`, None: not
    checked) and the signature first (refuse before touching anything), then baseline and
    compatibility."""
    problems = below_floor(spec, floor)
    if problems:
        raise BelowFloor(
            f"the spec for {spec.service} goes below its policy floor: {'; '.join(problems)}. "
            "Raise these fields (the floor is set by the worker's floors file)"
        )
    too_long = (
        []
        if silence_within_s is None
        else beyond_silence(spec, silence_within_s, request_timeout_s=endpoints.request_timeout_s)
    )
    if too_long:
        raise SpecError(
            f"the spec for {spec.service} has a window the silence automation would take for a "
            f"dead release: {'; '.join(too_long)}"
        )
    plan = plan_at_traffic(spec, endpoints)
    if plan is not None and plan.problems:
        if not spec.adapt_windows:
            raise SpecError(
                f"the spec for {spec.service} cannot decide at its traffic: "
                f"{'; '.join(plan.problems)}. Lengthen those windows (or set adapt_windows: true "
                "and preflight will)"
            )
        spec = adapted(spec, plan)
    if spec.traffic is not None and endpoints.envoy_synthetic_url is None:
        raise ConfigError(
            f"the spec for {spec.service} asks for synthetic traffic, but this stack has no "
            "synthetic Envoy listener to mark it: drop `traffic` (the gates judge users only)"
        )
    trusted = load_trusted_keys(Path(endpoints.keys_dir))
    verify(spec.candidate, trusted)
    provider = check_candidate_provider(spec, endpoints, providers)
    registry = connections.registry(endpoints.mlflow_uri)
    try:
        baseline = registry.resolve(spec.service, spec.baseline_alias)
    except AliasNotFound as exc:
        raise ConfigError(
            f"{spec.service} has no {spec.baseline_alias!r} version to compare against: publish "
            f"one first with `canaryflow publish MANIFEST --champion`"
        ) from exc
    report = registry.check_compatibility(spec.candidate.manifest, baseline.signed.manifest)
    if not report.compatible and not spec.allow_incompatible:
        raise CompatibilityError(
            f"{spec.candidate.manifest.model_id} is not compatible with {spec.baseline_alias} "
            f"v{baseline.version}: {'; '.join(report.problems)}. Set allow_incompatible: true in "
            "the spec if the change is intended (and re-index embeddings first)."
        )
    return Preflight(
        baseline=baseline,
        compatibility=report,
        key_id=spec.candidate.signature.key_id,
        provider=provider,
        plan=plan,
        spec=spec,
    )


TRAFFIC_LOOKBACKS_S = (3.0, 30.0, 300.0)
MIN_RECORDS_TO_PLAN = 20


def recent_user_rps(endpoints: Endpoints, service: str) -> float | None:
    """Users' requests per second to `service`: the highest rate over the last 3 s, 30 s and
    5 minutes among those holding enough requests, each over the span from its first to its
    last request. A pause within a longer look (traffic that resumed after a gap) lowers only
    that look, and records still being written lower only the shortest; a quiet service is
    measured over minutes. None with too few requests even in 5 minutes (nothing to plan)."""
    if endpoints.store_url is None:  # no store, no traffic to read
        return None
    now = datetime.now(UTC)
    store = connections.store(endpoints.store_url)  # shared by every step: never closed here
    rates = []
    for lookback_s in TRAFFIC_LOOKBACKS_S:
        since = now - timedelta(seconds=lookback_s)
        count, span_s = store.user_traffic(service, since, now)
        if count >= MIN_RECORDS_TO_PLAN:
            rates.append(count / max(1.0, span_s))
    return max(rates, default=None)


def plan_at_traffic(spec: ReleaseSpec, endpoints: Endpoints) -> ReleasePlan | None:
    rps = recent_user_rps(endpoints, spec.service)
    return None if rps is None else plan_release(spec, rps)


def check_candidate_provider(
    spec: ReleaseSpec, endpoints: Endpoints, providers: ProvidersFile | None
) -> ProviderCheck:
    """Before the registry is touched, so a provider that cannot be called moves no alias. No
    providers file: the stack's bare `provider_urls`, called without a key."""
    from canaryflow.providers.config import from_urls
    from canaryflow.providers.preflight import check_provider

    if providers is None:
        return check_provider(
            spec.candidate.manifest, from_urls(endpoints.provider_urls), source=BARE_URLS
        )
    return check_provider(spec.candidate.manifest, providers)


def publish(spec: ReleaseSpec, endpoints: Endpoints) -> PublishedVersion:
    registry = connections.registry(endpoints.mlflow_uri)
    published = registry.publish(spec.candidate)
    registry.start_challenger(spec.service, published.version)
    return published


def verify_artifact(endpoints: Endpoints, service: str, version: str) -> ArtifactDigest | None:
    """Re-read a published version's artifact (`version`: a number or an alias) and check it
    against the digest its verified signature covers; ArtifactError when it is gone or changed."""
    trusted = load_trusted_keys(Path(endpoints.keys_dir))
    registry = connections.registry(endpoints.mlflow_uri)
    if version.isdigit():
        published = registry.get(service, version, verify_with=trusted)
    else:
        published = registry.resolve(service, version, verify_with=trusted)
    return verify_published(published)


def evaluate_offline(
    spec: ReleaseSpec,
    baseline: PublishedVersion,
    endpoints: Endpoints,
    progress: Callable[[int, int], None] | None = None,
    providers: ProvidersFile | None = None,
) -> EvalReport:
    return evaluate_manifests(
        spec.candidate.manifest,
        baseline.signed.manifest,
        spec.suites,
        spec.policy.offline,
        endpoints,
        sample_per_suite=spec.sample_per_suite,
        progress=progress,
        providers=providers,
    )


def evaluate_manifests(
    candidate: ModelManifest,
    baseline: ModelManifest,
    suite_names: list[str],
    gate: OfflineGate,
    endpoints: Endpoints,
    *,
    sample_per_suite: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    providers: ProvidersFile | None = None,
) -> EvalReport:
    """Both models answer the same items through the provider's entry in `providers` (key,
    TLS, limits); None: the stack's bare `provider_urls`, called without a key."""
    from canaryflow.evaluation.offline import evaluate_paired
    from canaryflow.providers.config import from_urls

    return evaluate_paired(
        candidate,
        baseline,
        suite_names,
        gate,
        from_urls(endpoints.provider_urls) if providers is None else providers,
        Path(endpoints.home) / "eval-cache.db",
        source="the providers file" if providers is not None else BARE_URLS,
        sample_per_suite=sample_per_suite,
        progress=progress,
    )


def warm_up(endpoints: Endpoints, version: str) -> list[str]:
    """Every model service resolves `version` now, so the first users routed to it do not wait."""
    import httpx

    answered = []
    for url in endpoints.model_service_admin_urls:  # admin routes are not on the public port
        response = httpx.post(f"{url}/admin/warm", json={"version": version}, timeout=30)
        if response.status_code != 200:
            raise StackError(f"model service {url} cannot serve version {version}: {response.text}")
        answered.append(str(response.json()["model_id"]))
    return answered


@dataclass(frozen=True)
class TrafficRollback:
    before: Routes | None
    after: Routes
    rollback_ms: float
    confirmed: bool = True  # False: stable-only routes are written, Envoy has not said so yet

    def describe(self) -> str:
        if self.confirmed:
            return "all traffic on stable"
        return "stable-only routes written (the data plane's source of truth), not yet confirmed"


def rollback_traffic(endpoints: Endpoints, service: str) -> TrafficRollback:
    """Traffic first: one call to the controller, timed until Envoy confirms stable-only.

    An unconfirmed rollback is still a rollback (the routes file holds stable-only, Envoy
    loads it by itself): it is reported, not raised, so forensics and the registry follow.
    """
    controller = connections.traffic_controller(endpoints, service)
    started = time.perf_counter()
    try:
        change = controller.rollback()  # reads what was live and replaces it in one step
    except RollbackUnconfirmed as exc:
        elapsed = (time.perf_counter() - started) * 1000
        return TrafficRollback(exc.change.before, exc.change.after, elapsed, confirmed=False)
    return TrafficRollback(change.before, change.after, (time.perf_counter() - started) * 1000)


def observe_window(
    endpoints: Endpoints,
    policy: GatePolicy,
    *,
    stage: str,
    routes: Routes,
    step: int,
    window: int,
    window_s: float,
    memory: GateMemory | None,
) -> tuple[WindowResult, GateMemory]:
    """Let one window of live traffic pass, then judge candidate against stable in it."""
    from canaryflow.analysis.gates import judge_sample
    from canaryflow.analysis.promql import prometheus_target
    from canaryflow.analysis.sources import StoreSource

    if endpoints.store_url is None:
        raise ConfigError("no request store configured: endpoints.store_url is empty")
    started = datetime.now(UTC)
    time.sleep(window_s)
    ended = datetime.now(UTC)
    store = connections.store(endpoints.store_url)
    complete = store.watermarks.wait_until(
        routes.service, ended.timestamp(), alive_since=started.timestamp(),
        timeout_s=WATERMARK_WAIT_S,
    )  # fmt: skip
    role = Role.SHADOW if stage == "shadow" else Role.CANARY
    candidate_version = routes.shadow if role is Role.SHADOW else routes.canary
    if candidate_version is None:
        raise ConfigError(f"{stage} window without a {role.value} version in the routes")
    sample = StoreSource(store).window(
        routes.service, routes.stable, candidate_version, started, ended, candidate_role=role
    )
    target = prometheus_target(
        endpoints.prometheus_url, routes.service, routes.stable, candidate_version
    )
    gates, decision, memory = judge_sample(policy, sample, memory, promql=target)
    if not complete:
        late = GateResult(
            gate="watermark", severity=Severity.OBSERVABILITY, label=Label.NODATA,
            reason=f"records of the window were not all stored within {WATERMARK_WAIT_S:g} s "
            "of its end (a record writer is behind or gone): judged incomplete",
        )  # fmt: skip
        gates = (*gates, late)
        decision = combine(gates)
    result = WindowResult(
        stage="shadow" if role is Role.SHADOW else "canary",
        step=step,
        weight=routes.mirror_percent if role is Role.SHADOW else routes.weight,
        window=window,
        started_at=started,
        ended_at=ended,
        gates=gates,
        decision=decision,
        requests={"stable": sample.baseline.n, role.value: sample.candidate.n},
    )
    return result, memory


def observe_late_records(
    endpoints: Endpoints,
    policy: GatePolicy,
    *,
    routes: Routes,
    candidate_role: Role,
    last_end: datetime,
    late_s: float,
    memory: GateMemory | None,
) -> LateLook:
    """Wait until the requests that started before the last window's end have completed or
    timed out (`late_s`, the model services' provider timeout) and are stored, then judge those
    late finishers against the hard gates (`analysis.late`). A record writer that does not
    confirm them within `WATERMARK_WAIT_S` fails the look: unseen records are never a pass."""
    from datetime import timedelta

    from canaryflow.analysis.late import LateLook, judge_late

    if endpoints.store_url is None:
        raise ConfigError("no request store configured: endpoints.store_url is empty")
    candidate_version = routes.shadow if candidate_role is Role.SHADOW else routes.canary
    if candidate_version is None:
        raise ConfigError(f"late look without a {candidate_role.value} version in the routes")
    # The worker's provider timeout is the floor: a spec may wait longer, never shorter.
    late_s = late_records_wait_s(late_s, endpoints.request_timeout_s)
    until = last_end + timedelta(seconds=late_s)
    time.sleep(max(0.0, (until - datetime.now(UTC)).total_seconds()))
    store = connections.store(endpoints.store_url)
    complete = store.watermarks.wait_until(
        routes.service, until.timestamp(), alive_since=last_end.timestamp(),
        timeout_s=WATERMARK_WAIT_S,
    )  # fmt: skip
    service = routes.service
    baseline = store.records(service, last_end, until, role=Role.STABLE, version=routes.stable)
    candidate = store.records(service, last_end, until, role=candidate_role,
                              version=candidate_version)  # fmt: skip
    look = judge_late(policy, baseline, candidate, last_end, memory)
    if complete:
        return look
    unseen = GateResult(
        gate="watermark", severity=Severity.OBSERVABILITY, label=Label.ERROR,
        reason=f"records up to {late_s:g} s after the last window were not all stored within "
        f"{WATERMARK_WAIT_S:g} s (a record writer is behind or gone): late finishers unseen",
    )  # fmt: skip
    return LateLook((*look.gates, unseen), Decision.FAIL, look.candidate_n, look.baseline_n,
                    last_end)  # fmt: skip


def route_all_to(endpoints: Endpoints, service: str, version: str) -> TrafficRollback:
    """On-call's rollback to a chosen version: one verified write, timed like a rollback."""
    controller = connections.traffic_controller(endpoints, service)
    before = controller.current()
    started = time.perf_counter()
    target = Routes(service=service, stable=version)
    try:
        after = controller.set_routes(target)
    except RollbackUnconfirmed:
        return TrafficRollback(before, target, (time.perf_counter() - started) * 1000, False)
    return TrafficRollback(before, after, (time.perf_counter() - started) * 1000)


def retire_challenger(endpoints: Endpoints, service: str, reason: str) -> str | None:
    """The candidate a dead or silent release left behind: marked rolled back, `challenger`
    removed. Returns its version, or None when no version is challenging."""
    registry = connections.registry(endpoints.mlflow_uri)
    challenger = registry.aliases(service).get("challenger")
    if challenger is not None:
        registry.rollback(service, challenger, reason)
    return challenger


def candidate_is_live(endpoints: Endpoints, spec: ReleaseSpec) -> bool:
    """Whether the live routes send any traffic to this spec's candidate (its digest is the
    `challenger`'s and that version is the canary or the shadow)."""
    registry = connections.registry(endpoints.mlflow_uri)
    challenger = registry.aliases(spec.service).get("challenger")
    if challenger is None:
        return False
    if registry.get(spec.service, challenger).digest != spec.candidate.manifest.digest():
        return False
    routes = connections.traffic_controller(endpoints, spec.service).current()
    return routes is not None and challenger in (routes.canary, routes.shadow)
