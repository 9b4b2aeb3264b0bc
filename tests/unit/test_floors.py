"""Policy floors: a delivery may ask for more than its floor, never for less."""

from __future__ import annotations

from pathlib import Path

import pytest

from canaryflow.contracts import (
    ApprovalConfig,
    CanaryPlan,
    GatePolicy,
    LiveGate,
    LiveMetric,
    PolicyFloor,
    ReleaseSpec,
    Severity,
    ShadowConfig,
)
from canaryflow.errors import PolicyError
from canaryflow.floors import below_floor
from canaryflow.loading import load_floors, load_policy
from canaryflow.local import examples
from canaryflow.registry.signing import generate_keypair, sign
from canaryflow.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
FLOOR = PolicyFloor()


@pytest.fixture(scope="module")
def candidate(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    keys = generate_keypair(tmp_path_factory.mktemp("keys"), "ci", [examples.SERVICE])
    return sign(examples.manifest("1.2", "sandbox-good"), keys.private_path)


def spec(candidate, **fields: object) -> ReleaseSpec:  # type: ignore[no-untyped-def]
    return ReleaseSpec(service=examples.SERVICE, candidate=candidate, **fields)  # type: ignore[arg-type]


def test_a_spec_without_a_policy_gets_the_seed_gates_and_meets_the_floor(candidate) -> None:  # type: ignore[no-untyped-def]
    bare = spec(candidate)
    assert {g.metric for g in bare.policy.live} >= {g.metric for g in FLOOR.required_gates}
    assert below_floor(bare, FLOOR) == []


def test_the_code_default_policy_is_the_shipped_default_yaml() -> None:
    assert load_policy(ROOT / "deployments/policies/default.yaml") == GatePolicy()


def test_an_empty_live_policy_is_refused_gate_by_gate(candidate) -> None:  # type: ignore[no-untyped-def]
    problems = below_floor(spec(candidate, policy=GatePolicy(live=())), FLOOR)
    assert len(problems) == len(FLOOR.required_gates)
    assert all(p.startswith("policy.live needs a hard") for p in problems)


@pytest.mark.parametrize(
    ("gate", "refused"),
    [
        (LiveGate(metric=LiveMetric.ERROR_RATE, severity=Severity.HARD, max_rate=0.5), True),
        (LiveGate(metric=LiveMetric.ERROR_RATE, severity=Severity.SOFT, max_rate=0.01), True),
        (LiveGate(metric=LiveMetric.ERROR_RATE, severity=Severity.HARD, max_rate=0.01), False),
    ],
)
def test_a_required_gate_may_be_stricter_never_looser_or_soft(
    candidate,  # type: ignore[no-untyped-def]
    gate: LiveGate,
    refused: bool,
) -> None:
    live = (*(g for g in GatePolicy().live if g.metric is not LiveMetric.ERROR_RATE), gate)
    problems = below_floor(spec(candidate, policy=GatePolicy(live=live)), FLOOR)
    assert any("error_rate" in p for p in problems) is refused


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"canary": CanaryPlan(steps=[])}, "canary.steps needs at least 1"),
        ({"policy": GatePolicy(min_samples=1)}, "policy.min_samples must be at least 30"),
        ({"policy": GatePolicy(alpha=1e-9)}, "policy.alpha must be at least"),
        ({"allow_incompatible": True}, "allow_incompatible is not allowed"),
        (
            {"approval": ApprovalConfig(timeout_s=0, default_action="approve")},
            "approval.default_action must be 'reject'",
        ),
    ],
)
def test_each_loosening_is_named_with_its_floor(
    candidate,  # type: ignore[no-untyped-def]
    fields: dict[str, object],
    expected: str,
) -> None:
    problems = below_floor(spec(candidate, **fields), FLOOR)
    assert any(expected in p for p in problems), problems


def test_a_service_may_require_shadow(candidate) -> None:  # type: ignore[no-untyped-def]
    strict = PolicyFloor(require_shadow=True)
    assert below_floor(spec(candidate, shadow=ShadowConfig(enabled=False)), strict) == [
        "shadow.enabled must be true for this service"
    ]


def test_floors_file_per_service_with_a_default(tmp_path: Path) -> None:
    path = tmp_path / "floors.yaml"
    path.write_text(
        "default:\n  min_samples: 50\nservices:\n  payments:\n    require_shadow: true\n"
    )
    assert load_floors(path)["default"].min_samples == 50
    settings = Settings(floors_file=path)
    assert settings.floor_for("payments").require_shadow is True
    assert settings.floor_for("other").min_samples == 50
    assert Settings().floor_for("other") == PolicyFloor()


def test_a_malformed_floors_file_says_what_is_wrong(tmp_path: Path) -> None:
    path = tmp_path / "floors.yaml"
    path.write_text("default:\n  min_samples: none\n")
    with pytest.raises(PolicyError, match="min_samples"):
        load_floors(path)
    path.write_text("oops: 1\n")
    with pytest.raises(PolicyError, match="'default' and/or 'services'"):
        load_floors(path)


def test_synthetic_load_is_off_unless_asked(candidate) -> None:  # type: ignore[no-untyped-def]
    assert spec(candidate).traffic is None


@pytest.mark.parametrize(
    ("gate", "refused"),
    [
        (LiveGate(metric=LiveMetric.ERROR_RATE, severity=Severity.HARD, max_rate=0.01,
                  relative_ratio=5.0), True),
        (LiveGate(metric=LiveMetric.ERROR_RATE, severity=Severity.HARD, max_rate=0.01,
                  relative_ratio=1.5), False),
        (LiveGate(metric=LiveMetric.LATENCY_P95, severity=Severity.HARD, max_ratio=1.2,
                  tolerance=0.3), True),
        (LiveGate(metric=LiveMetric.LATENCY_P95, severity=Severity.HARD, max_ratio=1.2,
                  tolerance=0.1), False),
    ],
)  # fmt: skip
def test_the_comparisons_with_stable_cannot_be_switched_off_by_a_huge_value(
    candidate,  # type: ignore[no-untyped-def]
    gate: LiveGate,
    refused: bool,
) -> None:
    live = (*(g for g in GatePolicy().live if g.metric is not gate.metric), gate)
    problems = below_floor(spec(candidate, policy=GatePolicy(live=live)), FLOOR)
    assert any(str(gate.metric) in p for p in problems) is refused
    if refused:
        assert any("at most" in p and ("relative_ratio" in p or "tolerance" in p) for p in problems)
