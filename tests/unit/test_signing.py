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
    KeyNotAllowedError,
    generate_keypair,
    key_id,
    load_private_key,
    load_trusted_keys,
    sign,
    verify,
    write_signed,
)

SERVICE = "my-assistant"


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
    generate_keypair(tmp_path / "keys", "ci", [SERVICE])
    return tmp_path / "keys"


def test_generate_keypair_writes_private_key_readable_by_owner_only(tmp_path: Path) -> None:
    pair = generate_keypair(tmp_path, "ci", [SERVICE])
    assert pair.private_path == tmp_path / "ci.key"
    assert stat.S_IMODE(pair.private_path.stat().st_mode) == 0o600
    assert pair.public_path.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert pair.key_id == key_id(load_private_key(pair.private_path).public_key())
    assert len(pair.key_id) == 16 and int(pair.key_id, 16) >= 0


def test_generate_keypair_refuses_to_overwrite(tmp_path: Path) -> None:
    generate_keypair(tmp_path, "ci", [SERVICE])
    before = (tmp_path / "ci.key").read_bytes()
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        generate_keypair(tmp_path, "ci", ["*"])
    assert (tmp_path / "ci.key").read_bytes() == before
    assert (tmp_path / "ci.services").read_text().splitlines()[1:] == [SERVICE]


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
    other = generate_keypair(tmp_path / "other", "rogue", [SERVICE])
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
    ids = {generate_keypair(tmp_path, name, [SERVICE]).key_id for name in ("a", "b", "c")}
    assert set(load_trusted_keys(tmp_path)) == ids


def test_a_pub_file_that_is_not_a_key_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "junk.pub").write_text("hello")
    with pytest.raises(ConfigError, match=r"junk\.pub"):
        load_trusted_keys(tmp_path)


def test_missing_private_key_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such private key"):
        sign(make_manifest(), tmp_path / "absent.key")


# --------------------------------------------------------------------------- key bindings


def test_a_key_signs_for_the_services_it_is_bound_to(tmp_path: Path) -> None:
    pair = generate_keypair(tmp_path, "ci", [SERVICE, "support-bot"])
    trusted = load_trusted_keys(tmp_path)
    assert trusted.services_of(pair.key_id) == {SERVICE, "support-bot"}
    for service in (SERVICE, "support-bot"):
        verify(sign(make_manifest(model_id=f"{service}/m-v1.0+ds-1"), pair.private_path), trusted)


def test_a_key_bound_to_another_service_is_refused_naming_both_and_the_fix(
    tmp_path: Path,
) -> None:
    pair = generate_keypair(tmp_path, "ci", ["support-bot"])
    signed = sign(make_manifest(), pair.private_path)  # a manifest of my-assistant
    with pytest.raises(KeyNotAllowedError) as caught:
        verify(signed, load_trusted_keys(tmp_path))
    message = str(caught.value)
    assert f"for service '{SERVICE}'" in message
    assert pair.key_id in message and "may sign only for support-bot" in message
    assert str(tmp_path / "ci.services") in message  # where to bind it
    assert isinstance(caught.value, UnknownKeyError)  # refused like any untrusted key


@pytest.mark.parametrize(
    "binding", [None, "", "# nothing yet\n\n"], ids=["no-file", "empty", "comments"]
)
def test_an_unbound_key_is_refused_for_every_service(tmp_path: Path, binding: str | None) -> None:
    pair = generate_keypair(tmp_path, "ci", ["*"])
    if binding is None:
        pair.services_path.unlink()  # type: ignore[union-attr]
    else:
        pair.services_path.write_text(binding)  # type: ignore[union-attr]
    trusted = load_trusted_keys(tmp_path)
    assert pair.key_id in trusted, "the key is still known: only its binding is missing"
    for service in (SERVICE, "support-bot"):
        with pytest.raises(KeyNotAllowedError, match="may sign for none") as caught:
            verify(
                sign(make_manifest(model_id=f"{service}/m-v1.0+ds-1"), pair.private_path), trusted
            )
        assert "ci.services" in str(caught.value) and "canaryflow keys --service" in str(
            caught.value
        )


def test_a_star_binding_allows_every_service_explicitly(tmp_path: Path) -> None:
    pair = generate_keypair(tmp_path, "ci", ["*"])
    trusted = load_trusted_keys(tmp_path)
    for service in (SERVICE, "support-bot", "payments"):
        verify(sign(make_manifest(model_id=f"{service}/m-v1.0+ds-1"), pair.private_path), trusted)


def test_a_plain_dict_of_keys_carries_no_binding_and_trusts_nothing(keys: Path) -> None:
    """Keys that lost their bindings on the way (a plain dict) never widen trust."""
    signed = sign(make_manifest(), keys / "ci.key")
    plain = dict(load_trusted_keys(keys))
    with pytest.raises(KeyNotAllowedError, match="no service binding"):
        verify(signed, plain)  # type: ignore[arg-type]


def test_the_binding_is_checked_after_the_signature(tmp_path: Path) -> None:
    """A manifest re-labelled to another service is a broken signature, not a binding error."""
    pair = generate_keypair(tmp_path, "ci", [SERVICE])
    signed = sign(make_manifest(), pair.private_path)
    moved = signed.model_copy(
        update={"manifest": make_manifest(model_id="payments/gemini-docs-v1.2+ds-20260112")}
    )
    with pytest.raises(SignatureError, match="changed after it was signed"):
        verify(moved, load_trusted_keys(tmp_path))


@pytest.mark.parametrize(
    "services, problem",
    [([], "name the services"), (["*", SERVICE], "either"), (["two words"], "not a service")],
    ids=["none", "star-and-names", "blank"],
)
def test_generate_keypair_needs_a_clear_binding(
    tmp_path: Path, services: list[str], problem: str
) -> None:
    with pytest.raises(ConfigError, match=problem):
        generate_keypair(tmp_path, "ci", services)
    assert list(tmp_path.iterdir()) == [], "nothing is written for a bad binding"


def test_binding_file_with_comments_and_a_bad_line(tmp_path: Path) -> None:
    pair = generate_keypair(tmp_path, "ci", [SERVICE])
    assert pair.services_path is not None
    pair.services_path.write_text(f"# CI of the assistant\n{SERVICE}  # main\n\nsupport-bot\n")
    assert load_trusted_keys(tmp_path).services_of(pair.key_id) == {SERVICE, "support-bot"}
    pair.services_path.write_text("*\nsupport-bot\n")
    with pytest.raises(ConfigError, match=r"ci\.services"):
        load_trusted_keys(tmp_path)


def test_one_key_in_two_files_with_different_bindings_is_an_error(tmp_path: Path) -> None:
    pair = generate_keypair(tmp_path, "ci", [SERVICE])
    (tmp_path / "copy.pub").write_bytes(pair.public_path.read_bytes())
    (tmp_path / "copy.services").write_text("*\n")
    with pytest.raises(ConfigError, match="different service bindings"):
        load_trusted_keys(tmp_path)


def test_the_keys_command_writes_the_binding(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from canaryflow.app.cli import main

    assert main(["keys", "--dir", str(tmp_path), "--name", "ci", "--service", SERVICE]) == 0
    assert "may sign for my-assistant" in capsys.readouterr().out
    verify(sign(make_manifest(), tmp_path / "ci.key"), load_trusted_keys(tmp_path))
    with pytest.raises(SystemExit):
        main(["keys", "--dir", str(tmp_path / "other"), "--name", "ci"])  # --service is required
