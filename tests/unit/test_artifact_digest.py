"""The artifact digest helper: streamed in bounded chunks, and the manifest fields it fills."""

from __future__ import annotations

import hashlib
import io
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path

import pytest

from canaryflow.contracts import ModelManifest, Origin, Price
from canaryflow.errors import ArtifactChanged, ArtifactError
from canaryflow.registry.artifacts import (
    CHUNK_BYTES,
    check_artifact,
    digest_file,
    digest_stream,
    digest_uri,
    local_path,
    record_artifact,
)

MIB = 1 << 20


def make_manifest(**changes: object) -> ModelManifest:
    fields: dict[str, object] = {
        "model_id": "my-assistant/gemini-docs-v1.2+ds-20260112",
        "created_at": datetime(2026, 1, 12, 9, 30, tzinfo=UTC),
        "origin": Origin(provider="sandbox", model="docs-large"),
        "prompt_template": "Answer briefly: {input}",
        "tokenizer_version": "tok-3",
        "embedding_version": "emb-2",
        "license": "apache-2.0",
        "price": Price(input_per_1k=0.1, output_per_1k=0.2),
    }
    fields.update(changes)
    return ModelManifest.model_validate(fields)


def write_large(path: Path, mib: int) -> str:
    """A file of `mib` MiB written a MiB at a time; returns its sha256."""
    expected = hashlib.sha256()
    with path.open("wb") as handle:
        for index in range(mib):
            block = bytes([index % 251]) * MIB
            handle.write(block)
            expected.update(block)
    return expected.hexdigest()


def test_a_stream_is_read_in_fixed_chunks_until_it_ends() -> None:
    data = bytes(range(256)) * 5000  # 1,280,000 bytes
    source = io.BytesIO(data)
    asked: list[int] = []

    def read(n: int) -> bytes:
        asked.append(n)
        return source.read(n)

    sha256, size = digest_stream(read, chunk_bytes=64 * 1024)
    assert (sha256, size) == (hashlib.sha256(data).hexdigest(), len(data))
    assert set(asked) == {64 * 1024}
    assert len(asked) == -(-len(data) // (64 * 1024)) + 1  # every chunk, then the empty read


def test_a_large_file_is_hashed_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "adapter.safetensors"
    expected = write_large(path, 48)
    tracemalloc.start()
    try:
        found = digest_file(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (found.sha256, found.size) == (expected, 48 * MIB)
    assert peak < 3 * CHUNK_BYTES, f"peak {peak} bytes for a 48 MiB file"


def test_local_uris_are_absolute_paths_or_file_uris(tmp_path: Path) -> None:
    assert local_path(f"file://{tmp_path}/a%20b.bin") == tmp_path / "a b.bin"
    assert local_path(str(tmp_path / "a.bin")) == tmp_path / "a.bin"
    assert local_path("s3://bucket/key") is None
    with pytest.raises(ArtifactError, match="relative path; write it absolute"):
        local_path("adapters/a.bin")
    with pytest.raises(ArtifactError, match="canaryflow reads local paths, file:// and s3://"):
        digest_uri("gs://bucket/key")


def test_a_directory_is_refused_with_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="is a directory; package the adapter as one file"):
        digest_file(tmp_path)


def test_signing_records_the_digest_and_publishing_checks_it(tmp_path: Path) -> None:
    path = tmp_path / "adapter.bin"
    path.write_bytes(b"weights v1")
    manifest = record_artifact(make_manifest(adapter_uri=str(path)))
    assert manifest.adapter_sha256 == hashlib.sha256(b"weights v1").hexdigest()
    assert manifest.adapter_bytes == 10
    assert check_artifact(manifest) is not None
    path.write_bytes(b"weights v2")
    new = hashlib.sha256(b"weights v2").hexdigest()
    with pytest.raises(ArtifactChanged) as caught:
        check_artifact(manifest)
    assert str(caught.value).startswith(
        f"artifact {path} changed since it was signed: sha256 {new}, "
        f"manifest says {manifest.adapter_sha256}; restore the signed artifact, or re-sign"
    )
    with pytest.raises(ArtifactChanged, match="changed since it was signed"):
        record_artifact(manifest)  # a digest already recorded is checked, never replaced


def test_an_artifact_without_a_signed_digest_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "adapter.bin"
    path.write_bytes(b"weights")
    with pytest.raises(ArtifactError, match="its signature covers no digest of it; sign it"):
        check_artifact(make_manifest(adapter_uri=str(path)))
    assert check_artifact(make_manifest()) is None


def test_a_manifest_without_the_new_fields_keeps_its_canonical_form() -> None:
    manifest = make_manifest(adapter_uri="s3://models/a.bin")
    assert "adapter_sha256" not in manifest.canonical()
    assert "adapter_bytes" not in manifest.canonical()
    assert '"adapter_uri":"s3://models/a.bin"' in manifest.canonical()
    signed_fields = make_manifest(
        adapter_uri="s3://models/a.bin", adapter_sha256="ab" * 32, adapter_bytes=3
    )
    assert f'"adapter_sha256":"{"ab" * 32}"' in signed_fields.canonical()
    assert signed_fields.digest() != manifest.digest()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"adapter_sha256": "ab" * 32}, "go together"),
        ({"adapter_bytes": 3}, "go together"),
        ({"adapter_sha256": "ab" * 32, "adapter_bytes": 3}, "without adapter_uri"),
        ({"adapter_uri": "/a", "adapter_sha256": "AB" * 32, "adapter_bytes": 3}, "pattern"),
    ],
)
def test_the_digest_fields_are_validated(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_manifest(**changes)
