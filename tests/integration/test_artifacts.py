"""Publishing a manifest publishes its artifact: a local file, or an object on a real
S3-compatible server (moto's, on loopback), read and checked against the signed digest."""

from __future__ import annotations

import hashlib
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from canaryflow import runbook
from canaryflow.contracts import Endpoints, ModelManifest, Origin, Price, ReleaseSpec
from canaryflow.errors import ArtifactChanged, ArtifactError, SignatureError
from canaryflow.local.processes import ManagedProcess, free_port, http_ok
from canaryflow.registry.artifacts import record_artifact, verify_published
from canaryflow.registry.signing import (
    TrustedKeys,
    generate_keypair,
    load_trusted_keys,
    sign,
    verify,
)
from canaryflow.registry.versions import (
    TAG_ADAPTER_BYTES,
    TAG_ADAPTER_SHA256,
    TAG_ADAPTER_URI,
    MlflowRegistry,
)

BUCKET = "models"


@dataclass
class Store:
    """Where a test puts artifacts: `put` writes bytes and returns the URI, `remove` deletes."""

    put: Callable[[str, bytes], str]
    remove: Callable[[str], None]


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """moto's S3 server on a free loopback port; dummy credentials live in this process's
    environment for the module only. Yields a boto3 client for the test's own uploads."""
    import boto3

    home = tmp_path_factory.mktemp("s3")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = ManagedProcess(
        "moto-s3",
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        home / "moto.log",
        http_ok(f"{url}/moto-api/"),
    )
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.setenv("AWS_ENDPOINT_URL", url)
        env.delenv("AWS_PROFILE", raising=False)
        server.start(timeout_s=60)
        try:
            client = boto3.client("s3")
            client.create_bucket(Bucket=BUCKET)
            yield client
        finally:
            server.stop()


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "local":

        def put_local(name: str, data: bytes) -> str:
            path = tmp_path / name
            path.write_bytes(data)
            return f"file://{path}"

        return Store(put_local, lambda name: (tmp_path / name).unlink())
    client = request.getfixturevalue("s3_server")
    prefix = f"adapters/{uuid.uuid4().hex[:8]}"

    def put_s3(name: str, data: bytes) -> str:
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{name}", Body=data)
        return f"s3://{BUCKET}/{prefix}/{name}"

    return Store(put_s3, lambda name: client.delete_object(Bucket=BUCKET, Key=f"{prefix}/{name}"))


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("keys")
    generate_keypair(directory, "ci", ["*"])
    return directory


@pytest.fixture(scope="module")
def trusted(keys: Path) -> TrustedKeys:
    return load_trusted_keys(keys)


@pytest.fixture(scope="module")
def registry(mlflow_server: str) -> MlflowRegistry:
    return MlflowRegistry(mlflow_server)


@pytest.fixture
def service() -> str:
    return f"art-{uuid.uuid4().hex[:8]}"


def make_manifest(service: str, version: str, adapter_uri: str | None) -> ModelManifest:
    return ModelManifest(
        model_id=f"{service}/docs-v{version}+ds-20260112",
        created_at=datetime(2026, 1, 12, 9, 30, tzinfo=UTC),
        origin=Origin(provider="sandbox", model="docs-large"),
        adapter_uri=adapter_uri,
        prompt_template="Answer briefly: {input}",
        tokenizer_version="tok-3",
        embedding_version="emb-2",
        license="apache-2.0",
        price=Price(input_per_1k=0.1, output_per_1k=0.2),
    )


def versions_of(registry: MlflowRegistry, service: str) -> list[str]:
    return [str(v.version) for v in registry.client.search_model_versions(f"name = '{service}'")]


def test_publish_records_the_artifacts_size_and_sha256(
    store: Store, registry: MlflowRegistry, trusted: TrustedKeys, keys: Path, service: str
) -> None:
    data = b"lora weights " * 10_000
    uri = store.put("adapter.safetensors", data)
    signed = sign(record_artifact(make_manifest(service, "1.0", uri)), keys / "ci.key")
    expected = hashlib.sha256(data).hexdigest()
    assert (signed.manifest.adapter_sha256, signed.manifest.adapter_bytes) == (expected, len(data))
    published = registry.publish(signed, verify_with=trusted)
    assert published.created
    assert published.tags[TAG_ADAPTER_URI] == uri
    assert published.tags[TAG_ADAPTER_SHA256] == expected
    assert published.tags[TAG_ADAPTER_BYTES] == str(len(data))
    stored = registry.get(service, published.version, verify_with=trusted)
    assert stored.signed.manifest.adapter_sha256 == expected  # inside the signed manifest
    found = verify_published(stored)
    assert found is not None and (found.sha256, found.size) == (expected, len(data))


def test_a_changed_artifact_is_refused_before_anything_is_published(
    store: Store, registry: MlflowRegistry, trusted: TrustedKeys, keys: Path, service: str
) -> None:
    uri = store.put("adapter.bin", b"signed weights")
    signed = sign(record_artifact(make_manifest(service, "1.0", uri)), keys / "ci.key")
    store.put("adapter.bin", b"evil!! weights")  # same size, other bytes
    with pytest.raises(ArtifactChanged) as caught:
        registry.publish(signed, verify_with=trusted)
    assert str(caught.value) == (
        f"artifact {uri} changed since it was signed: "
        f"sha256 {hashlib.sha256(b'evil!! weights').hexdigest()}, "
        f"manifest says {signed.manifest.adapter_sha256}; restore the signed artifact, or "
        "re-sign the manifest for the new one (`canaryflow sign` records its digest)"
    )
    store.put("adapter.bin", b"longer weights than signed")
    with pytest.raises(
        ArtifactChanged, match=r"changed since it was signed: 26 bytes, manifest says 14;"
    ):
        registry.publish(signed, verify_with=trusted)
    assert versions_of(registry, service) == []


def test_a_missing_artifact_is_refused(
    store: Store, registry: MlflowRegistry, trusted: TrustedKeys, keys: Path, service: str
) -> None:
    uri = store.put("adapter.bin", b"weights")
    signed = sign(record_artifact(make_manifest(service, "1.0", uri)), keys / "ci.key")
    store.remove("adapter.bin")
    with pytest.raises(
        ArtifactError, match=rf"^artifact {uri} does not exist.*; put the artifact there"
    ):
        registry.publish(signed, verify_with=trusted)
    assert versions_of(registry, service) == []


def test_a_tampered_digest_fails_signature_verification(
    store: Store, registry: MlflowRegistry, trusted: TrustedKeys, keys: Path, service: str
) -> None:
    """Whoever swaps the artifact cannot make the manifest follow: the digest is signed."""
    uri = store.put("adapter.bin", b"signed weights")
    signed = sign(record_artifact(make_manifest(service, "1.0", uri)), keys / "ci.key")
    store.put("adapter.bin", b"other weights")
    fields = signed.manifest.model_dump()
    fields.update(adapter_sha256=hashlib.sha256(b"other weights").hexdigest(), adapter_bytes=13)
    tampered = signed.model_copy(update={"manifest": ModelManifest.model_validate(fields)})
    with pytest.raises(SignatureError, match="changed after it was signed"):
        verify(tampered, trusted)
    with pytest.raises(SignatureError, match="changed after it was signed"):
        registry.publish(tampered, verify_with=trusted)
    assert versions_of(registry, service) == []


def test_no_alias_moves_when_the_candidates_artifact_is_refused(
    store: Store,
    registry: MlflowRegistry,
    mlflow_server: str,
    keys: Path,
    service: str,
    tmp_path: Path,
) -> None:
    champion_uri = store.put("v1.bin", b"champion weights")
    champion = sign(record_artifact(make_manifest(service, "1.0", champion_uri)), keys / "ci.key")
    first = registry.publish(champion)
    registry.promote(service, first.version)
    before = registry.aliases(service)
    uri = store.put("v2.bin", b"candidate weights")
    candidate = sign(record_artifact(make_manifest(service, "2.0", uri)), keys / "ci.key")
    store.remove("v2.bin")
    endpoints = Endpoints(home=str(tmp_path), mlflow_uri=mlflow_server, keys_dir=str(keys))
    spec = ReleaseSpec(service=service, candidate=candidate)
    with pytest.raises(ArtifactError, match="does not exist"):
        runbook.publish(spec, endpoints)
    assert registry.aliases(service) == before == {"champion": first.version}
    assert versions_of(registry, service) == [first.version]


def test_verify_artifact_rechecks_a_published_version(
    store: Store, registry: MlflowRegistry, mlflow_server: str, keys: Path, service: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    uri = store.put("adapter.bin", b"published weights")
    signed = sign(record_artifact(make_manifest(service, "1.0", uri)), keys / "ci.key")
    published = registry.publish(signed)
    registry.promote(service, published.version)
    endpoints = Endpoints(home=str(tmp_path), mlflow_uri=mlflow_server, keys_dir=str(keys))
    found = runbook.verify_artifact(endpoints, service, "champion")
    assert found is not None and found.sha256 == signed.manifest.adapter_sha256
    store.put("adapter.bin", b"published weightz")
    with pytest.raises(ArtifactChanged, match=f"artifact {uri} changed since it was signed"):
        runbook.verify_artifact(endpoints, service, published.version)
    registry.set_tags(service, published.version, {TAG_ADAPTER_SHA256: "0" * 64})
    with pytest.raises(ArtifactChanged, match="its signed manifest says"):
        runbook.verify_artifact(endpoints, service, published.version)


def test_an_artifact_signed_without_its_digest_is_refused(
    store: Store, registry: MlflowRegistry, keys: Path, service: str
) -> None:
    uri = store.put("adapter.bin", b"weights")
    signed = sign(make_manifest(service, "1.0", uri), keys / "ci.key")  # signed without reading
    with pytest.raises(ArtifactError, match="its signature covers no digest of it; sign it again"):
        registry.publish(signed)
    assert versions_of(registry, service) == []


def test_s3s_own_checksum_is_checked_too(
    s3_server: Any, registry: MlflowRegistry, keys: Path, service: str
) -> None:
    data = b"weights with a checksum"
    key = f"adapters/{uuid.uuid4().hex[:8]}/adapter.bin"
    s3_server.put_object(Bucket=BUCKET, Key=key, Body=data, ChecksumAlgorithm="SHA256")
    head = s3_server.head_object(Bucket=BUCKET, Key=key, ChecksumMode="ENABLED")
    assert head.get("ChecksumSHA256"), "the server keeps no SHA-256 checksum: nothing to test"
    signed = sign(record_artifact(make_manifest(service, "1.0", f"s3://{BUCKET}/{key}")),
                  keys / "ci.key")  # fmt: skip
    assert registry.publish(signed).tags[TAG_ADAPTER_SHA256] == hashlib.sha256(data).hexdigest()
