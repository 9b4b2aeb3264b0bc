"""A spec's windows must fit under the silence automation's `within` (prefect.yaml)."""

from __future__ import annotations

from pathlib import Path

import pytest

from canaryflow import runbook
from canaryflow.contracts import (
    CanaryPlan,
    CanaryStep,
    Endpoints,
    PolicyFloor,
    ReleaseSpec,
    ShadowConfig,
)
from canaryflow.errors import ConfigError, SpecError
from canaryflow.floors import JUDGING_SLACK_S, beyond_silence
from canaryflow.loading import load_silence_within
from canaryflow.local import examples
from canaryflow.registry.signing import generate_keypair, sign

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def candidate(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    keys = generate_keypair(tmp_path_factory.mktemp("keys"), "ci", [examples.SERVICE])
    return sign(examples.manifest("1.2", "sandbox-good"), keys.private_path)


def spec(candidate, **fields: object) -> ReleaseSpec:  # type: ignore[no-untyped-def]
    return ReleaseSpec(service=examples.SERVICE, candidate=candidate, **fields)  # type: ignore[arg-type]


def test_the_within_is_read_from_the_prefect_yaml_trigger() -> None:
    assert load_silence_within(ROOT / "prefect.yaml") == 3600.0
    assert JUDGING_SLACK_S >= runbook.WATERMARK_WAIT_S


def test_a_prefect_yaml_without_the_trigger_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "prefect.yaml"
    path.write_text("deployments: [{name: rollback, triggers: [{name: other, within: 5}]}]\n")
    with pytest.raises(ConfigError, match="canaryflow-silent-canary"):
        load_silence_within(path)
    path.write_text("deployments: [{triggers: [{name: canaryflow-silent-canary, within: x}]}]\n")
    with pytest.raises(ConfigError, match="positive `within`"):
        load_silence_within(path)


def test_the_default_spec_fits_the_shipped_within(candidate) -> None:  # type: ignore[no-untyped-def]
    assert beyond_silence(spec(candidate), load_silence_within(ROOT / "prefect.yaml")) == []


def test_each_window_too_long_is_named_with_its_value_and_limit(candidate) -> None:  # type: ignore[no-untyped-def]
    steps = [CanaryStep(weight=5, window_s=60), CanaryStep(weight=10, window_s=580)]
    long = spec(
        candidate,
        shadow=ShadowConfig(window_s=575, duration_s=600),
        canary=CanaryPlan(steps=steps, late_records_s=570),
    )
    problems = beyond_silence(long, 600.0)
    assert [p.split(" ")[0] for p in problems] == [
        "shadow.window_s",
        "canary.steps[1].window_s",
        "canary.late_records_s",
    ]
    assert problems[1].startswith("canary.steps[1].window_s is 580 s")
    assert (
        "within (600 s, prefect.yaml trigger canaryflow-silent-canary): at most 570 s"
        in (problems[1])
    )
    # A disabled shadow is never judged: its window does not count.
    off = long.model_copy(update={"shadow": ShadowConfig(enabled=False, window_s=575)})
    assert len(beyond_silence(off, 600.0)) == 2


def test_preflight_refuses_before_touching_anything(candidate, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """No MLflow, no keys: the refusal comes first, with one sentence per field."""
    nowhere = Endpoints(home=str(tmp_path), mlflow_uri="http://127.0.0.1:9", keys_dir="none")
    long = spec(candidate, canary=CanaryPlan(steps=[CanaryStep(weight=5, window_s=3590)]))
    with pytest.raises(SpecError) as refused:
        runbook.preflight(long, nowhere, PolicyFloor(), silence_within_s=3600.0)
    message = str(refused.value)
    assert "canary.steps[0].window_s is 3590 s" in message
    assert "at most 3570 s" in message and "within (3600 s" in message


def test_a_spec_cannot_shorten_the_late_look_below_the_data_planes_timeout(candidate) -> None:  # type: ignore[no-untyped-def]
    """The wait for the last window's late finishers is the worker's provider timeout; a
    delivery may lengthen it, never skip it with `late_records_s: 0`."""
    from canaryflow.floors import late_records_wait_s

    skip = spec(candidate, canary=CanaryPlan(late_records_s=0))
    assert late_records_wait_s(skip.canary.late_records_s, request_timeout_s=30.0) == 30.0
    longer = spec(candidate, canary=CanaryPlan(late_records_s=45))
    assert late_records_wait_s(longer.canary.late_records_s, request_timeout_s=30.0) == 45.0
    # The silence check counts the wait the release will really make.
    assert [p.split(" ")[0] for p in beyond_silence(skip, 600.0, request_timeout_s=580)] == [
        "canary.late_records_s"
    ]
