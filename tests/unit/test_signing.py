from __future__ import annotations

import base64
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest

from canaryflow.contracts import ModelManifest, Origin, Price, Signature
from canaryflow.errors import ConfigError, SignatureError, UnknownKeyError
from canaryflow.loading import load_signed_manifest
from canaryflow.registry.signing import (
    generate_keypair,
    key_id,
    load_private_key,
    load_trusted_keys,
    sign,
    verify,
    write_signed,
)


def make_manifest(**changes: object) -> ModelManifest:
    fields: dict[str, object] = {
        "model_id": "my-assistant/gemini-docs-v1.2+ds-20260112",
        "created_at": datetime(2026, 1, 12, 9, 30, tzinfo=UTC),
        "origin": Origin(provider="sandbox", model="docs-large"),
        "prompt_template": "Answer briefly: {input}",
        "tokenizer_version": "tok-3",
        "embedding_version": "emb-2",
        "license": "apache-2.0",
        "data_residency": ("eu",),
        "price": Price(input_per_1k=0.1, output_per_1k=0.2),
    }
    fields.update(changes)
    return ModelManifest.model_validate(fields)


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    generate_keypair(tmp_path / "keys", "ci")
    return tmp_path / "keys"


def test_generate_keypair_writes_private_key_readable_by_owner_only(tmp_path: Path) -> None:
    pair = generate_keypair(tmp_path, "ci")
    assert pair.private_path == tmp_path / "ci.key"
    assert stat.S_IMODE(pair.private_path.stat().st_mode) == 0o600
    assert pair.public_path.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert pair.key_id == key_id(load_private_key(pair.private_path).public_key())
    assert len(pair.key_id) == 16 and int(pair.key_id, 16) >= 0


def test_generate_keypair_refuses_to_overwrite(tmp_path: Path) -> None:
    generate_keypair(tmp_path, "ci")
    before = (tmp_path / "ci.key").read_bytes()
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        generate_keypair(tmp_path, "ci")
    assert (tmp_path / "ci.key").read_bytes() == before


def test_signed_manifest_verifies_with_trusted_keys(keys: Path) -> None:
    signed = sign(make_manifest(), keys / "ci.key")
    trusted = load_trusted_keys(keys)
    assert signed.signature.key_id in trusted
    verify(signed, trusted)
    assert len(base64.b64decode(signed.signature.value)) == 64


def test_manifest_changed_after_signing_is_caught(keys: Path) -> None:
    signed = sign(make_manifest(), keys / "ci.key")
    tampered = signed.model_copy(update={"manifest": make_manifest(license="proprietary")})
    with pytest.raises(SignatureError, match="changed after it was signed") as caught:
        verify(tampered, load_trusted_keys(keys))
    assert tampered.manifest.digest() in str(caught.value)


def test_unknown_key_names_key_and_directory(tmp_path: Path, keys: Path) -> None:
    other = generate_keypair(tmp_path / "other", "rogue")
    signed = sign(make_manifest(), other.private_path)
    with pytest.raises(UnknownKeyError) as caught:
        verify(signed, load_trusted_keys(keys))
    message = str(caught.value)
    assert other.key_id in message
    assert "1 trusted keys" in message and str(keys) in message


@pytest.mark.parametrize(
    "value",
    [
        "not base64 at all!!",
        base64.b64encode(b"short").decode(),
        base64.b64encode(b"\0" * 64).decode(),
        "",
    ],
    ids=["not-base64", "wrong-length", "zero-bytes", "empty"],
)
def test_garbage_signature_is_a_signature_error(keys: Path, value: str) -> None:
    signed = sign(make_manifest(), keys / "ci.key")
    broken = signed.model_copy(
        update={"signature": Signature(key_id=signed.signature.key_id, value=value)}
    )
    with pytest.raises(SignatureError):
        verify(broken, load_trusted_keys(keys))


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_written_signed_manifest_loads_back_and_verifies(keys: Path, suffix: str) -> None:
    signed = sign(make_manifest(), keys / "ci.key")
    path = keys.parent / f"release{suffix}"
    write_signed(signed, path)
    loaded = load_signed_manifest(path)
    assert loaded == signed
    verify(loaded, load_trusted_keys(keys))


def test_trusted_keys_holds_every_pub_file(tmp_path: Path) -> None:
    ids = {generate_keypair(tmp_path, name).key_id for name in ("a", "b", "c")}
    assert set(load_trusted_keys(tmp_path)) == ids


def test_a_pub_file_that_is_not_a_key_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "junk.pub").write_text("hello")
    with pytest.raises(ConfigError, match=r"junk\.pub"):
        load_trusted_keys(tmp_path)


def test_missing_private_key_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such private key"):
        sign(make_manifest(), tmp_path / "absent.key")
