"""A moderation endpoint as a live checker: OpenAI's `POST /v1/moderations` -> unsafe + categories.

Why: a moderation model is cheap, fast and trained for exactly the unsafe question, where a
keyword list is not. Any OpenAI-compatible endpoint answers `{"results": [{"flagged": bool,
"categories": {name: bool}, ...}]}`; the flagged categories go into the verdict's evidence. An
error, a timeout or a reply of another shape is UNCHECKED, never "safe".
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from canaryflow.contracts import ModerationChecker, ProvidersFile
from canaryflow.errors import CanaryflowError
from canaryflow.providers.client import ProviderClient
from canaryflow.providers.config import provider_config
from canaryflow.quality.verdicts import CheckItem, Outcome, Verdict, bounded, unchecked

FLAG = "unsafe"


def read_moderation(body: bytes) -> tuple[bool, tuple[str, ...]]:
    """(flagged, flagged categories) of the first result; ValueError for any other shape."""
    try:
        result = json.loads(body)["results"][0]
        flagged, categories = result["flagged"], result.get("categories") or {}
    except (ValueError, KeyError, IndexError, TypeError):
        raise ValueError("not a moderation result ({results: [{flagged, categories}]})") from None
    if not isinstance(flagged, bool) or not isinstance(categories, dict):
        raise ValueError("flagged is not true/false, or categories is not an object")
    return flagged, tuple(sorted(name for name, on in categories.items() if on is True))


class Moderation:
    """The `moderation` checker: the answer sent to the entry's `/moderations`."""

    def __init__(
        self,
        config: ModerationChecker,
        providers: ProvidersFile,
        environ: Mapping[str, str] | None = None,
        source: str = "providers",
    ) -> None:
        self.config = config
        self._provider = provider_config(providers, config.provider, source)
        self._environ = environ
        self._client: ProviderClient | None = None

    @property
    def name(self) -> str:
        return self.config.label

    async def start(self) -> None:
        if self._client is None:
            client = ProviderClient.for_provider(
                self.config.provider,
                self._provider,
                self._environ,
                timeout_s=self.config.timeout_s,
                max_retries=1,
            )
            self._client = await client.__aenter__()

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.__aexit__(None, None, None)

    async def check(self, item: CheckItem) -> Sequence[Verdict]:
        provenance = {"model": self.config.model}
        if self._client is None:
            await self.start()
        assert self._client is not None
        payload: dict[str, Any] = {"input": bounded(item.answer)}
        if self.config.model is not None:
            payload["model"] = self.config.model
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.config.timeout_s):
                _status, body, _ = await self._client.post("/moderations", payload)
        except TimeoutError:
            why = f"moderation timed out after {self.config.timeout_s:g} s"
            return unchecked(self.name, (FLAG,), why, **provenance)
        except CanaryflowError as exc:
            return unchecked(self.name, (FLAG,), f"moderation failed: {exc}", **provenance)
        latency_ms = (time.perf_counter() - started) * 1000
        try:
            flagged, categories = read_moderation(body)
        except ValueError as exc:
            return unchecked(self.name, (FLAG,), f"moderation answered {exc}", **provenance)
        return (
            Verdict(
                self.name,
                FLAG,
                Outcome.FLAGGED if flagged else Outcome.PASSED,
                label="flagged" if flagged else "clean",
                categories=categories,
                latency_ms=latency_ms,
                model=self.config.model,
            ),
        )
