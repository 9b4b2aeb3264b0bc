"""The files the README points at load, so the documentation cannot rot."""

from __future__ import annotations

from pathlib import Path

import pytest

from canaryflow.errors import ManifestError, PolicyError, SpecError
from canaryflow.loading import load_manifest, load_policy, load_spec
from canaryflow.registry.signing import generate_keypair, sign, write_signed

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "deployments" / "examples"


@pytest.mark.parametrize("name", ["default", "strict"])
def test_shipped_policies_load(name: str) -> None:
    policy = load_policy(REPO / "deployments" / "policies" / f"{name}.yaml")
    assert {g.metric.value for g in policy.live} >= {"latency_p95", "hallucination_rate"}


def test_example_manifest_and_spec_load_after_signing(tmp_path: Path) -> None:
    manifest = load_manifest(EXAMPLES / "manifest.yaml")
    assert manifest.service == "my-assistant"
    keys = generate_keypair(tmp_path / "keys", "ci", [manifest.service])
    spec_dir = tmp_path / "spec"
    spec_dir.mkdir()
    write_signed(sign(manifest, keys.private_path), spec_dir / "manifest.signed.json")
    (spec_dir / "release.yaml").write_text((EXAMPLES / "release.yaml").read_text())
    spec = load_spec(spec_dir / "release.yaml", REPO / "deployments" / "policies")
    assert [s.weight for s in spec.canary.steps] == [5, 10, 25]
    assert spec.policy.name == "default"


def test_unsigned_candidate_says_how_to_sign(tmp_path: Path) -> None:
    (tmp_path / "release.yaml").write_text("service: my-assistant\ncandidate: m.yaml\n")
    (tmp_path / "m.yaml").write_text((EXAMPLES / "manifest.yaml").read_text())
    with pytest.raises(ManifestError, match="canaryflow sign"):
        load_spec(tmp_path / "release.yaml")


def test_bad_manifest_names_the_field(tmp_path: Path) -> None:
    text = (EXAMPLES / "manifest.yaml").read_text().replace("v1.2+ds", "1.2-ds")
    (tmp_path / "m.yaml").write_text(text.replace("temperature: 0.2", "temperature: 9"))
    with pytest.raises(ManifestError) as error:
        load_manifest(tmp_path / "m.yaml")
    assert "model_id" in str(error.value) and "parameters.temperature" in str(error.value)


def test_bad_spec_and_policy_name_the_field(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("live:\n  - {metric: latency_p95, severity: hard}\n")
    with pytest.raises(PolicyError, match="exactly one of max_ratio"):
        load_policy(tmp_path / "p.yaml")
    (tmp_path / "s.yaml").write_text("service: x\ncanary: {steps: [{weight: 5}, {weight: 1}]}\n")
    with pytest.raises(SpecError, match="must not decrease"):
        load_spec(tmp_path / "s.yaml")
    (tmp_path / "broken.yaml").write_text("service: [unclosed\n")
    with pytest.raises(Exception, match="not valid"):
        load_spec(tmp_path / "broken.yaml")
