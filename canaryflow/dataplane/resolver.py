"""Manifest (and alias) resolution for the model service: cached, refreshed behind, fail-static.

The registry (MLflow) is blocking and slow, and it may be down. So the first resolution of a
version runs its fetch in a thread (concurrent callers share that one fetch), later ones are
answered from memory, a stale entry is refreshed in the background while the old value keeps
serving, and a failed refresh keeps the last good value (fail-static). Only a version never seen
while the registry is unreachable is an error.

A manifest from the registry is served only once its signature verifies with the trusted keys
(`--keys-dir`) and its key is bound to the service: once per version load, never per request. A
version that fails is an error for its requests (never served, never cached as good) and is
fetched and checked again after `retry_s`, so a version published again with a good signature
is served without a restart. A failed refresh of a version already verified keeps the verified
copy, as for an outage.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from canaryflow.contracts import ModelManifest
from canaryflow.errors import ConfigError, RegistryError, SecurityError
from canaryflow.loading import load_manifest, load_signed_manifest, read_document

Fetch = Callable[[str, str], ModelManifest]
"""(service, version) -> manifest; blocking, may raise."""
AliasFetch = Callable[[str, str], str]
"""(service, alias) -> version; blocking, may raise."""
T = TypeVar("T")


@dataclass
class _Entry(Generic[T]):
    value: T
    fresh_until: float
    refreshing: bool = False


class _TtlCache(Generic[T]):
    def __init__(
        self,
        load: Callable[[str, str], T],
        what: str,
        ttl_s: float,
        retry_s: float,
        wait_s: float,
        on_error: Callable[[BaseException], None],
    ) -> None:
        self._load = load
        self._wait_s = wait_s
        self._what = what
        self._ttl_s = ttl_s
        self._retry_s = retry_s
        self._on_error = on_error
        self._entries: dict[tuple[str, str], _Entry[T]] = {}
        self._pending: dict[tuple[str, str], asyncio.Future[T]] = {}
        self._failed: dict[tuple[str, str], tuple[float, BaseException]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def peek(self, key: tuple[str, str]) -> T | None:
        entry = self._entries.get(key)
        return None if entry is None else entry.value

    def cached(self) -> list[tuple[str, str]]:
        return list(self._entries)

    async def get(self, key: tuple[str, str]) -> T:
        entry = self._entries.get(key)
        if entry is not None:
            if not entry.refreshing and time.monotonic() >= entry.fresh_until:
                entry.refreshing = True
                task = asyncio.create_task(self._refresh(key, entry))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            return entry.value
        pending = self._pending.get(key)
        if pending is None:
            failed = self._failed.get(key)
            if failed is not None and time.monotonic() < failed[0]:
                raise self._unavailable(key, failed[1])
            pending = asyncio.get_running_loop().create_future()
            self._pending[key] = pending
            task = asyncio.create_task(self._first_load(key, pending))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        # shield: a caller that gives up must not cancel the fetch the others wait for.
        try:
            return await asyncio.wait_for(asyncio.shield(pending), self._wait_s)
        except TimeoutError:
            raise RegistryError(
                f"the registry did not return {self._what} {key[1]!r} of service {key[0]!r} "
                f"within {self._wait_s:.0f} s; it keeps trying in the background, retry shortly"
            ) from None

    async def _first_load(self, key: tuple[str, str], pending: asyncio.Future[T]) -> None:
        try:
            value = await asyncio.to_thread(self._load, *key)
        except Exception as exc:
            self._on_error(exc)
            self._failed[key] = (time.monotonic() + self._retry_s, exc)
            pending.set_exception(self._unavailable(key, exc))
            pending.exception()  # retrieved: no "never retrieved" warning when nobody waits
        else:
            self._entries[key] = _Entry(value, time.monotonic() + self._ttl_s)
            self._failed.pop(key, None)
            pending.set_result(value)
        finally:
            self._pending.pop(key, None)

    async def _refresh(self, key: tuple[str, str], entry: _Entry[T]) -> None:
        try:
            value = await asyncio.to_thread(self._load, *key)
        except Exception as exc:
            self._on_error(exc)
            entry.fresh_until = time.monotonic() + self._retry_s  # keep serving the old value
        else:
            entry.value = value
            entry.fresh_until = time.monotonic() + self._ttl_s
        finally:
            entry.refreshing = False

    def _unavailable(self, key: tuple[str, str], exc: BaseException) -> RegistryError:
        service, name = key
        if isinstance(exc, SecurityError):
            return RegistryError(
                f"refusing to serve {self._what} {name!r} of service {service!r}: its manifest "
                f"failed verification ({type(exc).__name__}: {exc}). A manifest is never served "
                "unverified: publish it again from its signed file, or fix the trusted keys "
                "(--keys-dir)."
            )
        return RegistryError(
            f"cannot resolve {self._what} {name!r} of service {service!r}: the registry failed "
            f"({type(exc).__name__}: {exc}) and no copy is cached. Check that the version exists "
            "and that the registry is reachable (--registry-uri)."
        )

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class CachedResolver:
    """Resolve (service, version) to its manifest, and (service, alias) to a version.

    `on_error` is called for every failed fetch (the service counts
    `canaryflow_registry_errors_total`); `retry_s` spaces out attempts after a failure;
    `wait_s` bounds how long a request waits for a first fetch (MLflow's client retries for
    minutes when its server is down: no request may hang on that).
    """

    def __init__(
        self,
        fetch: Fetch,
        ttl_s: float = 30.0,
        *,
        alias_fetch: AliasFetch | None = None,
        retry_s: float = 1.0,
        wait_s: float = 5.0,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.on_error: Callable[[BaseException], None] = on_error or (lambda exc: None)
        self._manifests = _TtlCache(fetch, "version", ttl_s, retry_s, wait_s, self._error)
        self._aliases = _TtlCache(
            alias_fetch or _no_aliases, "alias", ttl_s, retry_s, wait_s, self._error
        )

    def _error(self, exc: BaseException) -> None:
        self.on_error(exc)

    async def manifest(self, service: str, version: str) -> ModelManifest:
        return await self._manifests.get((service, version))

    async def version_of(self, service: str, alias: str) -> str:
        return await self._aliases.get((service, alias))

    def cached_versions(self, service: str) -> list[str]:
        return sorted(v for s, v in self._manifests.cached() if s == service)

    async def aclose(self) -> None:
        await self._manifests.aclose()
        await self._aliases.aclose()


def _no_aliases(service: str, alias: str) -> str:
    raise RegistryError(
        f"no registry to look up alias {alias!r} of {service!r}: pass --default-version or "
        "--registry-uri"
    )


def mlflow_fetchers(tracking_uri: str, keys_dir: Path | None = None) -> tuple[Fetch, AliasFetch]:
    """Fetchers over the MLflow registry client; mlflow is imported on first use only.

    `fetch` returns a manifest only when its signature verifies with the trusted keys in
    `keys_dir` and the key is bound to the service; without `keys_dir` it returns none (fail
    closed). The keys folder is read at each load, so a key added or removed counts from the
    next version load on.
    """
    registry: Any = None

    def client() -> Any:
        nonlocal registry
        if registry is None:
            from canaryflow.registry.versions import MlflowRegistry  # lazy: pulls in mlflow (~2 s)

            registry = MlflowRegistry(tracking_uri)
        return registry

    def fetch(service: str, version: str) -> ModelManifest:
        from canaryflow.registry.signing import load_trusted_keys

        if keys_dir is None:
            raise SecurityError(
                "this model service has no trusted keys, so it serves no manifest from the "
                "registry: start it with --keys-dir DIR (the folder of trusted .pub and "
                ".services files)"
            )
        trusted = load_trusted_keys(keys_dir)
        manifest: ModelManifest = client().get(service, version, trusted).signed.manifest
        return manifest

    def alias_fetch(service: str, alias: str) -> str:
        version: str = client().resolve(service, alias).version
        return version

    return fetch, alias_fetch


def default_resolver(
    registry_uri: str | None,
    manifests: Mapping[str, Path],
    ttl_s: float,
    keys_dir: Path | None,
) -> CachedResolver:
    """The service's resolver: local manifest files first, then the registry, whose manifests
    are verified with the trusted keys in `keys_dir` (see `mlflow_fetchers`)."""
    if registry_uri is None and not manifests:
        raise ConfigError("the service needs --registry-uri or --manifest VERSION=PATH")
    fetch: Fetch | None = None
    alias_fetch: AliasFetch | None = None
    if registry_uri is not None:
        fetch, alias_fetch = mlflow_fetchers(registry_uri, keys_dir)
    if manifests:
        local = {v: load_manifest_file(p) for v, p in manifests.items()}
        fetch = local_fetch(local, fallback=fetch)
    assert fetch is not None
    return CachedResolver(fetch, ttl_s, alias_fetch=alias_fetch)


def load_manifest_file(path: Path) -> ModelManifest:
    """A manifest file, signed (`{manifest, signature}`) or plain."""
    data = read_document(path)
    if isinstance(data, dict) and "signature" in data:
        return load_signed_manifest(path).manifest
    return load_manifest(path)


def local_fetch(manifests: Mapping[str, ModelManifest], fallback: Fetch | None = None) -> Fetch:
    """Serve some versions from memory (local runs, benchmarks); ask `fallback` for the rest."""

    def fetch(service: str, version: str) -> ModelManifest:
        found = manifests.get(version)
        if found is not None:
            if found.service != service:
                raise RegistryError(
                    f"manifest for version {version!r} belongs to {found.service!r}, "
                    f"not {service!r}: check --manifest and --service"
                )
            return found
        if fallback is not None:
            return fallback(service, version)
        raise RegistryError(
            f"version {version!r} is not among the local manifests {sorted(manifests)} and no "
            "registry is configured (--registry-uri)"
        )

    return fetch
