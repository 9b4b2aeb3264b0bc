"""The rate gates' e-process: valid under peeking, quick to reject a clearly bad rate."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import binom

from canaryflow.stats.sequential import SequentialState

BOUND, ALPHA, PER_WINDOW, WINDOWS = 0.005, 0.05, 200, 20


def run(counts: np.ndarray) -> list[int | None]:
    """Feed each simulated canary its windows; the window each one was rejected in, if any."""
    rejected = []
    for row in counts:
        state = SequentialState.start(BOUND, ALPHA)
        for events in row:
            state = state.update(int(events), PER_WINDOW)
        rejected.append(state.rejected_at)
    return rejected


def test_peeking_every_window_at_the_bound_keeps_false_rejections_below_alpha() -> None:
    counts = np.random.default_rng(11).binomial(PER_WINDOW, BOUND, size=(1000, WINDOWS))
    false_rejections = sum(r is not None for r in run(counts)) / len(counts)
    assert false_rejections <= ALPHA
    # The naive alternative, a fixed-sample exact test on the running counts at every look,
    # does inflate: that is why the gates carry an e-process.
    events, trials = counts.cumsum(axis=1), PER_WINDOW * np.arange(1, WINDOWS + 1)
    naive = (binom.sf(events - 1, trials, BOUND) < ALPHA).any(axis=1).mean()
    assert naive > false_rejections
    assert naive > ALPHA


def test_a_rate_below_the_bound_is_rejected_even_less() -> None:
    counts = np.random.default_rng(12).binomial(PER_WINDOW, BOUND / 2, size=(500, WINDOWS))
    assert sum(r is not None for r in run(counts)) / len(counts) <= ALPHA / 2


def test_four_times_the_bound_is_rejected_within_a_few_windows() -> None:
    counts = np.random.default_rng(13).binomial(PER_WINDOW, 4 * BOUND, size=(300, WINDOWS))
    windows = np.array([r if r is not None else WINDOWS + 1 for r in run(counts)])
    assert np.median(windows) <= 3
    assert (windows <= 5).mean() >= 0.9


def test_eight_percent_over_two_hundred_is_rejected_in_the_first_window() -> None:
    state = SequentialState.start(BOUND, ALPHA).update(16, 200)
    assert state.rejected_at == 1
    assert state.e_value >= 1 / ALPHA


def test_rejection_is_final_even_after_clean_windows() -> None:
    state = SequentialState.start(BOUND, ALPHA).update(16, 200)
    for _ in range(5):
        state = state.update(0, 200)
    assert state.rejected_at == 1
    assert state.windows == 6
    assert state.p_value <= ALPHA


def test_state_survives_a_json_round_trip() -> None:
    state = SequentialState.start(BOUND, ALPHA).update(3, 200).update(2, 150)
    text = json.dumps(state.model_dump(mode="json"))
    again = SequentialState.model_validate(json.loads(text))
    assert again == state
    assert (again.events, again.trials, again.windows) == (5, 350, 2)


def test_a_zero_bound_is_refuted_by_one_event() -> None:
    assert not SequentialState.start(0.0, ALPHA).update(0, 500).rejected
    assert SequentialState.start(0.0, ALPHA).update(1, 500).rejected


def test_counts_above_the_trials_are_refused() -> None:
    with pytest.raises(ValueError, match="events <= trials"):
        SequentialState.start(BOUND, ALPHA).update(5, 3)
