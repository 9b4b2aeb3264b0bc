"""Servers shared by the integration tests: each starts once per session and is always stopped."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.busy_prefect import BusyPrefect


@pytest.fixture
def busy_prefect(prefect_api: str) -> Iterator[BusyPrefect]:
    """A fresh proxy in front of the real Prefect server, forwarding everything until a test
    calls `fail(prefix, times)`; clients go to its `api_url`."""
    proxy = BusyPrefect(prefect_api.removesuffix("/api"))
    yield proxy
    proxy.close()
