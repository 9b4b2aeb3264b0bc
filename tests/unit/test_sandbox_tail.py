"""The sandbox's tail-only latency: a share of requests much slower at an unchanged median."""

from __future__ import annotations

import random
import statistics

import pytest

from canaryflow.errors import ConfigError
from canaryflow.sandbox.profiles import PROFILES, resolve_profile
from canaryflow.sandbox.server import Sandbox


def delays(model: str, n: int = 4000) -> list[float]:
    sandbox = Sandbox()
    sandbox._fresh = random.Random(11)  # a fixed stream of draws for the test
    profile = resolve_profile(model)
    assert profile is not None
    return sorted(sandbox._latency(profile) * 1000 for _ in range(n))


def test_a_tail_only_profile_keeps_the_median_and_slows_the_tail() -> None:
    base, tail = delays("sandbox-base"), delays("sandbox-tail-slow")
    assert statistics.median(tail) == pytest.approx(statistics.median(base), rel=0.05)
    p99 = int(0.99 * len(base))
    assert tail[p99] > 2.5 * base[p99]  # 5% of requests 4x slower
    assert sum(d > 4 * 40 * 0.6 for d in tail) / len(tail) == pytest.approx(0.05, abs=0.015)


def test_the_tail_is_an_override_like_any_field() -> None:
    profile = resolve_profile("sandbox-base@tail_share=0.05,tail_factor=4")
    assert profile is not None
    assert (profile.tail_share, profile.tail_factor) == (0.05, 4.0)
    assert (PROFILES["sandbox-tail-slow"].tail_share, PROFILES["sandbox-base"].tail_share) == (
        0.05,
        0.0,
    )
    with pytest.raises(ConfigError, match="tail_factor"):
        resolve_profile("sandbox-base@tail_factor=0.5")
    with pytest.raises(ConfigError, match="tail_share"):
        resolve_profile("sandbox-base@tail_share=2")
