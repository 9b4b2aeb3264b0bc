"""One paired offline evaluation against a configured provider: the client, the cache, the loop.

`runbook.evaluate_manifests` decides which providers apply (the worker's providers file, else the
stack's bare `provider_urls`); this module builds each provider's client from its entry (key by
reference, TLS, limits): one when both models live at the same provider, two when a release
moves to another one (the sandbox's champion against a candidate at your provider), and runs
the harness once. Suites whose items use a model-backed scorer also need `embedding_model`
(asked of the candidate's provider) or a judge (`judge_provider`, `judge_model`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path

from canaryflow.contracts import EvalReport, ModelManifest, OfflineGate, ProvidersFile
from canaryflow.evaluation.harness import evaluate
from canaryflow.evaluation.model_scorers import ModelScorers
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
    embedding_model: str | None = None,
    judge_provider: str | None = None,
    judge_model: str | None = None,
) -> EvalReport:
    """Both models answer the same items; answers are cached by (digest, messages, parameters).
    Every provider is looked up before any call: an unknown one costs no tokens."""
    judging = [judge_provider] if judge_provider and judge_model else []
    names = dict.fromkeys([candidate.origin.provider, baseline.origin.provider, *judging])
    configs = {name: provider_config(providers, name, source=source) for name in names}
    suites = [load_suite(suite) for suite in suite_names]
    cache = ResponseCache(cache_path)

    async def run() -> EvalReport:
        async with AsyncExitStack() as entered:
            clients = {
                name: await entered.enter_async_context(
                    ProviderClient.for_provider(name, config, cache=cache)
                )
                for name, config in configs.items()
            }
            scorer_models = ModelScorers(
                embeddings=clients[candidate.origin.provider],
                embedding_model=embedding_model,
                judge=clients[judging[0]] if judging else None,
                judge_model=judge_model,
            )
            return await evaluate(
                candidate,
                baseline,
                suites,
                clients[candidate.origin.provider],
                gate,
                sample_per_suite=sample_per_suite,
                progress=progress,
                baseline_client=clients[baseline.origin.provider],
                scorer_models=scorer_models,
            )

    try:
        return asyncio.run(run())
    finally:
        cache.close()
