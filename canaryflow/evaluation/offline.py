"""One paired offline evaluation against a configured provider: the client, the cache, the loop.

`runbook.evaluate_manifests` decides which providers apply (the worker's providers file, else the
stack's bare `provider_urls`); this module builds the provider's client from its entry (key by
reference, TLS, limits) and runs the harness once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from canaryflow.contracts import EvalReport, ModelManifest, OfflineGate, ProvidersFile
from canaryflow.errors import ConfigError
from canaryflow.evaluation.harness import evaluate
from canaryflow.evaluation.suites import load_suite
from canaryflow.providers.cache import ResponseCache
from canaryflow.providers.client import ProviderClient
from canaryflow.providers.config import provider_config


def evaluate_paired(
    candidate: ModelManifest,
    baseline: ModelManifest,
    suite_names: list[str],
    gate: OfflineGate,
    providers: ProvidersFile,
    cache_path: Path,
    *,
    source: str = "the providers file",
    sample_per_suite: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> EvalReport:
    """Both models answer the same items; answers are cached by (digest, messages, parameters)."""
    name = candidate.origin.provider
    if name != baseline.origin.provider:
        raise ConfigError("candidate and baseline must use the same provider for a paired eval")
    config = provider_config(providers, name, source=source)
    suites = [load_suite(suite) for suite in suite_names]
    cache = ResponseCache(cache_path)

    async def run() -> EvalReport:
        async with ProviderClient.for_provider(name, config, cache=cache) as client:
            return await evaluate(
                candidate,
                baseline,
                suites,
                client,
                gate,
                sample_per_suite=sample_per_suite,
                progress=progress,
            )

    try:
        return asyncio.run(run())
    finally:
        cache.close()
