"""The offline gate's goal rows, simulated on its own decision function with fixed seeds.

Each release draws the suite's paired outcomes from a multinomial over (only baseline passed, only
candidate passed, the rest) and asks `compare_suite` for its label; the decision depends on the
counts alone, so each distinct (b, c) is judged once. Shares carry Wilson 95% intervals, and a
goal holds only when the whole interval is on its side. `python -m tests.unit.test_offline_power`
prints the table in docs/benchmarks.md.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from canaryflow.contracts import Label, OfflineGate
from canaryflow.contracts.policy import DEFAULT_SUITE_MARGINS
from canaryflow.evaluation.compare import compare_suite
from canaryflow.evaluation.suites import load_suite
from canaryflow.loading import load_policy
from canaryflow.stats.proportions import (
    DISCORDANCE_FLOOR,
    detectable_drop,
    items_to_detect,
    wilson_interval,
)

REPO = Path(__file__).resolve().parents[2]
SEED = 20261216
RELEASES = 2_000
DEFAULT_SUITES = ("golden", "regression", "safety")
GATE = OfflineGate()  # alpha 0.05 and the shipped suites' margins, as in default.yaml


@dataclass(frozen=True)
class Row:
    name: str
    only_base: float  # P(baseline passed, candidate failed)
    only_cand: float  # P(candidate passed, baseline failed)


EQUAL_5 = Row("equal quality, 5% churn each way", 0.05, 0.05)
EQUAL_10 = Row("equal quality, 10% churn each way", 0.10, 0.10)
DROP_5 = Row("5-pt drop on 5% churn each way", 0.10, 0.05)
DROP_10 = Row("5-pt drop on 10% churn each way", 0.15, 0.10)


@functools.cache
def _label(suite: str, n: int, b: int, c: int) -> Label:
    pairs = [(True, False)] * b + [(False, True)] * c + [(True, True)] * (n - b - c)
    return compare_suite(suite, pairs, GATE).result.label


def simulate(row: Row, n: int, suite: str = "golden", seed: int = SEED) -> Counter[Label]:
    """Labels of RELEASES simulated releases of one suite of n items."""
    rng = np.random.default_rng([seed, n, round(1e4 * row.only_base), round(1e4 * row.only_cand)])
    p = [row.only_base, row.only_cand, 1 - row.only_base - row.only_cand]
    draws = rng.multinomial(n, p, size=RELEASES)
    return Counter(_label(suite, n, int(b), int(c)) for b, c, _ in draws)


def share(labels: Counter[Label], label: Label) -> tuple[float, float, float]:
    k = labels[label]
    lo, hi = wilson_interval(k, RELEASES)
    return k / RELEASES, lo, hi


@pytest.fixture(scope="module")
def n() -> int:
    sizes = {len(load_suite(name)) for name in DEFAULT_SUITES}
    assert len(sizes) == 1, sizes
    return sizes.pop()


@pytest.mark.parametrize("row", [EQUAL_5, EQUAL_10], ids=["churn5", "churn10"])
def test_equal_quality_rarely_reviewed_and_almost_never_failed(row: Row, n: int) -> None:
    labels = simulate(row, n)
    review, fail = share(labels, Label.REVIEW), share(labels, Label.FAIL)
    assert review[2] <= 0.20, f"REVIEW {review}"
    assert fail[2] <= 0.025, f"FAIL {fail}"


@pytest.mark.parametrize("row", [DROP_5, DROP_10], ids=["churn5", "churn10"])
def test_a_five_point_drop_fails_with_80_percent_power(row: Row, n: int) -> None:
    fail = share(simulate(row, n), Label.FAIL)
    assert fail[1] >= 0.80, f"FAIL {fail}"


def test_the_stated_detectable_drop_is_near_its_simulated_power(n: int) -> None:
    """At the drop the report states, a release on the floor's discordance fails about 80% of the
    time: a little more, since the formula leaves the drop's own variance out."""
    margin = GATE.margin_for("golden")
    drop = detectable_drop(n, margin, GATE.alpha, DISCORDANCE_FLOOR)
    churn = (DISCORDANCE_FLOOR - drop) / 2
    fail = share(simulate(Row("at the stated drop", churn + drop, churn), n), Label.FAIL)
    assert 0.78 <= fail[0] <= 0.90, f"FAIL {fail} at a drop of {drop:.4f}"


def test_shipped_suites_are_as_large_as_the_power_calculation_asks(n: int) -> None:
    policy = load_policy(REPO / "deployments" / "policies" / "default.yaml")
    assert policy.offline.margins == DEFAULT_SUITE_MARGINS
    for suite in DEFAULT_SUITES:
        margin = policy.offline.margin_for(suite)
        needed = items_to_detect(0.05, margin, policy.offline.alpha, DISCORDANCE_FLOOR)
        assert needed is not None and n >= needed, (suite, n, needed)
        assert detectable_drop(n, margin, policy.offline.alpha, DISCORDANCE_FLOOR) <= 0.05


def test_every_suite_report_states_n_margin_and_detectable_drop(n: int) -> None:
    result = compare_suite("golden", [(True, True)] * (n - 30) + [(True, False)] * 30, GATE)
    detail = result.result.evidence.detail
    assert detail["n"] == n and detail["margin"] == 0.035 and detail["power"] == 0.8
    assert detail["discordance_observed"] == pytest.approx(30 / n)
    assert detail["discordance_assumed"] == DISCORDANCE_FLOOR
    mde = detail["detectable_drop"]
    assert isinstance(mde, float) and 0.035 < mde <= 0.05
    assert f"n={n}, 3.5-pt margin, 80% power against a drop of {100 * mde:.1f} pts" in (
        result.result.reason
    )


def main() -> None:
    """The table of docs/benchmarks.md, "Offline gate: power"."""
    size = len(load_suite("golden"))
    rows = [(EQUAL_5, Label.REVIEW), (EQUAL_10, Label.REVIEW), (DROP_5, Label.FAIL)]
    rows += [(DROP_10, Label.FAIL)]
    print(f"n={size} per suite, {RELEASES} releases per row, seed {SEED}")
    for row, label in rows:
        labels = simulate(row, size)
        for shown in (label, Label.FAIL) if label is Label.REVIEW else (label,):
            k, lo, hi = share(labels, shown)
            print(
                f"| {row.name} | {shown.value} | {100 * k:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] |"
            )


if __name__ == "__main__":
    main()
