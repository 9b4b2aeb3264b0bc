from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from canaryflow.contracts import ModelManifest, Origin, Price, SignedManifest
from canaryflow.errors import (
    AliasNotFound,
    RegistryError,
    SignatureError,
    TransientRegistryError,
    UnknownKeyError,
)
from canaryflow.local.processes import free_port
from canaryflow.registry.signing import TrustedKeys, generate_keypair, load_trusted_keys, sign
from canaryflow.registry.versions import MlflowRegistry, check_compatibility


def make_manifest(service: str, version: str = "1.0", **changes: object) -> ModelManifest:
    fields: dict[str, object] = {
        "model_id": f"{service}/gemini-docs-v{version}+ds-20260112",
        "created_at": datetime(2026, 1, 12, 9, 30, tzinfo=UTC),
        "origin": Origin(provider="sandbox", model="docs-large"),
        "prompt_template": "Answer briefly: {input}",
        "tokenizer_version": "tok-3",
        "embedding_version": "emb-2",
        "license": "apache-2.0",
        "data_residency": ("eu",),
        "price": Price(input_per_1k=0.1, output_per_1k=0.2),
        "eval_uri": "runs:/abc/eval",
    }
    fields.update(changes)
    return ModelManifest.model_validate(fields)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("keys")
    generate_keypair(directory, "ci", ["*"])  # a fresh service per test
    return directory


@pytest.fixture(scope="module")
def trusted(keys: Path) -> TrustedKeys:
    return load_trusted_keys(keys)


@pytest.fixture(scope="module")
def registry(mlflow_server: str) -> MlflowRegistry:
    return MlflowRegistry(mlflow_server)


@pytest.fixture
def service() -> str:
    """A fresh registered model per test: the server is shared by the whole session."""
    return f"svc-{uuid.uuid4().hex[:8]}"


def signed_for(service: str, keys: Path, version: str = "1.0", **changes: object) -> SignedManifest:
    return sign(make_manifest(service, version, **changes), keys / "ci.key")


def test_publish_is_idempotent_on_digest(
    registry: MlflowRegistry, service: str, keys: Path, trusted: TrustedKeys
) -> None:
    signed = signed_for(service, keys)
    first = registry.publish(signed, verify_with=trusted)
    again = registry.publish(signed, verify_with=trusted)
    assert first.created and not again.created
    assert again.version == first.version == "1"
    assert again.run_id == first.run_id
    assert first.digest == signed.manifest.digest() == first.tags["canaryflow.digest"]
    assert first.status == "published"
    assert first.tags["canaryflow.key_id"] == signed.signature.key_id
    assert first.tags["canaryflow.signature"] == signed.signature.value
    assert first.tags["canaryflow.model_id"] == signed.manifest.model_id
    assert first.tags["canaryflow.eval_uri"] == "runs:/abc/eval"
    assert first.tags["canaryflow.provider"] == "sandbox"
    assert first.tags["canaryflow.provider_model"] == "docs-large"
    assert first.tags["canaryflow.template_hash"] == signed.manifest.prompt_template_hash


def test_a_second_manifest_gets_a_new_version(
    registry: MlflowRegistry, service: str, keys: Path
) -> None:
    first = registry.publish(signed_for(service, keys, "1.0"))
    second = registry.publish(signed_for(service, keys, "1.1"))
    assert (first.version, second.version) == ("1", "2")
    assert second.created
    fetched = registry.get(service, "2")
    assert fetched.signed == second.signed
    assert fetched.signed.manifest.model_id.endswith("v1.1+ds-20260112")


def test_unknown_key_is_refused_before_publishing(
    registry: MlflowRegistry, service: str, tmp_path: Path
) -> None:
    rogue = generate_keypair(tmp_path, "rogue", ["*"])
    signed = sign(make_manifest(service), rogue.private_path)
    other = generate_keypair(tmp_path / "trusted", "ci", ["*"])
    with pytest.raises(UnknownKeyError, match=rogue.key_id):
        registry.publish(signed, verify_with=load_trusted_keys(other.public_path.parent))
    assert registry.aliases(service) == {}
    with pytest.raises(RegistryError, match="not found"):
        registry.get(service, "1")


def test_tampered_manifest_is_refused_on_publish(
    registry: MlflowRegistry, service: str, keys: Path, trusted: TrustedKeys
) -> None:
    signed = signed_for(service, keys)
    tampered = signed.model_copy(
        update={"manifest": make_manifest(service, data_residency=("eu", "us"))}
    )
    with pytest.raises(SignatureError, match="changed after it was signed"):
        registry.publish(tampered, verify_with=trusted)


def test_manifest_tampered_inside_the_registry_is_caught(
    registry: MlflowRegistry, service: str, keys: Path, trusted: TrustedKeys
) -> None:
    published = registry.publish(signed_for(service, keys))
    edited = published.signed.model_copy(
        update={"manifest": make_manifest(service, license="proprietary")}
    )
    # Overwrite the stored artifact behind canaryflow's back, as a registry user could.
    registry.client.log_dict(
        published.run_id, edited.model_dump(mode="json"), "manifest/signed_manifest.json"
    )
    with pytest.raises(SignatureError, match="changed in the registry"):
        registry.get(service, published.version)


def test_alias_moves_through_a_release(registry: MlflowRegistry, service: str, keys: Path) -> None:
    v1 = registry.publish(signed_for(service, keys, "1.0")).version
    v2 = registry.publish(signed_for(service, keys, "1.1")).version
    v3 = registry.publish(signed_for(service, keys, "1.2")).version

    assert registry.start_challenger(service, v1) is None
    assert registry.promote(service, v1) is None
    assert registry.aliases(service) == {"champion": v1}

    assert registry.start_challenger(service, v2) == v1
    assert registry.aliases(service) == {"champion": v1, "challenger": v2}
    assert registry.get(service, v2).tags["canaryflow.previous_champion"] == v1
    assert registry.promote(service, v2) == v1
    assert registry.aliases(service) == {"champion": v2, "last-stable": v1}
    promoted = registry.resolve(service, "champion")
    assert (promoted.version, promoted.status) == (v2, "promoted")
    assert "champion" in promoted.aliases
    assert registry.promote(service, v2) == v1, "a repeated promote changes nothing"
    assert registry.aliases(service) == {"champion": v2, "last-stable": v1}

    registry.start_challenger(service, v3)
    assert registry.rollback(service, v3, "p95 latency 2.1x baseline") == v2
    assert registry.aliases(service) == {"champion": v2, "last-stable": v1}
    rolled = registry.get(service, v3)
    assert rolled.status == "rolled_back"
    assert rolled.tags["canaryflow.status_reason"] == "p95 latency 2.1x baseline"
    assert rolled.tags["canaryflow.previous_champion"] == v2


def test_rollback_to_restores_last_stable(
    registry: MlflowRegistry, service: str, keys: Path
) -> None:
    v1 = registry.publish(signed_for(service, keys, "1.0")).version
    v2 = registry.publish(signed_for(service, keys, "1.1")).version
    registry.promote(service, v1)
    registry.promote(service, v2)
    assert registry.rollback_to(service, reason="pager: error spike") == v1
    assert registry.aliases(service)["champion"] == v1
    old = registry.get(service, v2)
    assert (
        old.status == "rolled_back" and "pager: error spike" in old.tags["canaryflow.status_reason"]
    )
    restored = registry.get(service, v1)
    assert restored.status == "promoted"
    assert restored.tags["canaryflow.restored_from"] == v2
    assert registry.rollback_to(service, v1) == v1, "already champion: nothing moves"


def test_rollback_to_without_last_stable_says_what_to_do(
    registry: MlflowRegistry, service: str, keys: Path
) -> None:
    registry.promote(service, registry.publish(signed_for(service, keys)).version)
    with pytest.raises(AliasNotFound, match="name the target version"):
        registry.rollback_to(service)


def test_resolve_missing_alias_names_alias_and_service(
    registry: MlflowRegistry, service: str, keys: Path
) -> None:
    registry.publish(signed_for(service, keys))
    with pytest.raises(AliasNotFound, match=f"service {service} has no version with alias"):
        registry.resolve(service, "champion")
    with pytest.raises(AliasNotFound, match="'champion'"):
        registry.resolve("never-published", "champion")


def test_deleted_alias_no_longer_resolves(
    registry: MlflowRegistry, service: str, keys: Path
) -> None:
    version = registry.publish(signed_for(service, keys)).version
    registry.set_alias(service, "challenger", version)
    assert registry.resolve(service, "challenger").version == version
    registry.delete_alias(service, "challenger")
    registry.delete_alias(service, "challenger")  # deleting twice is fine
    with pytest.raises(AliasNotFound):
        registry.resolve(service, "challenger")


def test_set_status_rejects_unknown_status(
    registry: MlflowRegistry, service: str, keys: Path
) -> None:
    version = registry.publish(signed_for(service, keys)).version
    with pytest.raises(ValueError, match="not one of"):
        registry.set_status(service, version, "shipped")  # type: ignore[arg-type]
    registry.set_status(service, version, "canary", "step 2")
    registry.set_tags(service, version, {"team": "docs"})
    found = registry.get(service, version)
    assert found.status == "canary"
    assert found.tags["team"] == "docs"


def test_compatibility_problems_are_flagged(service: str) -> None:
    champion = make_manifest(service)
    assert check_compatibility(make_manifest(service, "1.1"), champion).compatible
    candidate = make_manifest(
        service,
        "1.1",
        tokenizer_version="tok-4",
        embedding_version="emb-3",
        data_residency=("eu", "us"),
        license="proprietary",
    )
    report = MlflowRegistry.check_compatibility(candidate, champion)
    assert not report.compatible
    joined = "\n".join(report.problems)
    assert len(report.problems) == 4
    for word in ("tokenizer_version", "embedding_version", "'us'", "license"):
        assert word in joined
    narrower = make_manifest(service, "1.1", data_residency=())
    assert check_compatibility(narrower, champion).compatible


def test_unreachable_mlflow_is_a_transient_error_within_seconds() -> None:
    registry = MlflowRegistry(f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    with pytest.raises(TransientRegistryError, match="retry"):
        registry.aliases("my-assistant")
    assert time.monotonic() - started < 15


def test_publish_and_alias_latency_over_http(
    registry: MlflowRegistry, service: str, keys: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Reported, not benchmarked: a few calls on a shared 2-core machine."""
    publish_s, alias_s, resolve_s = [], [], []
    for minor in range(3):
        signed = signed_for(service, keys, f"1.{minor}")
        started = time.perf_counter()
        version = registry.publish(signed).version
        publish_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        registry.set_alias(service, "champion", version)
        alias_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        registry.resolve(service, "champion")
        resolve_s.append(time.perf_counter() - started)
    with capsys.disabled():
        print(
            f"\npublish ms {[round(s * 1000) for s in publish_s]}, "
            f"set_alias ms {[round(s * 1000) for s in alias_s]}, "
            f"resolve ms {[round(s * 1000) for s in resolve_s]}"
        )
    assert registry.aliases(service) == {"champion": "3"}
