"""Ed25519 signatures over manifest digests: nothing moves traffic unless a trusted key signed it.

The signed message is the raw 32-byte sha256 digest of the manifest's canonical JSON
(`bytes.fromhex(manifest.digest())`), so any change to any field breaks the signature.
A key is named by `key_id`: the first 16 hex digits of sha256 over its raw 32-byte public key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from canaryflow.contracts import ModelManifest, Signature, SignedManifest
from canaryflow.errors import ConfigError, SignatureError, UnknownKeyError

SIGNATURE_BYTES = 64


@dataclass(frozen=True)
class KeyPair:
    private_path: Path
    public_path: Path
    key_id: str


class TrustedKeys(dict[str, Ed25519PublicKey]):
    """key id -> public key, remembering where the keys came from for error messages."""

    def __init__(
        self, keys: dict[str, Ed25519PublicKey] | None = None, directory: Path | None = None
    ) -> None:
        super().__init__(keys or {})
        self.directory = directory


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(directory: Path, name: str) -> KeyPair:
    """Write `<name>.key` (0600) and `<name>.pub`; an existing key is never overwritten."""
    private_path, public_path = directory / f"{name}.key", directory / f"{name}.pub"
    for path in (private_path, public_path):
        if path.exists():
            raise ConfigError(
                f"{path} already exists; refusing to overwrite a key. "
                "Pick another name or move the old key away first."
            )
    directory.mkdir(parents=True, exist_ok=True)
    private_key = Ed25519PrivateKey.generate()
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # O_EXCL closes the race between the exists() check and the write; 0600 from the first byte.
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private_pem)
    fd = os.open(public_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(public_pem)
    return KeyPair(private_path, public_path, key_id(private_key.public_key()))


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such private key; check the path (setting CANARYFLOW_SIGNING_KEY)"
        ) from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} holds a {type(key).__name__}; canaryflow signs with ed25519")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path} is not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path} holds a {type(key).__name__}; only ed25519 keys are trusted")
    return key


def load_trusted_keys(directory: Path) -> TrustedKeys:
    """Every `*.pub` in the directory; a file that is not an ed25519 key is an error."""
    if not directory.is_dir():
        raise ConfigError(
            f"trusted keys directory {directory} does not exist; "
            "create it and copy the signers' .pub files into it"
        )
    keys = {}
    for path in sorted(directory.glob("*.pub")):
        public_key = load_public_key(path)
        keys[key_id(public_key)] = public_key
    return TrustedKeys(keys, directory)


def sign(manifest: ModelManifest, private_key_path: Path) -> SignedManifest:
    private_key = load_private_key(private_key_path)
    value = private_key.sign(bytes.fromhex(manifest.digest()))
    signature = Signature(
        key_id=key_id(private_key.public_key()), value=base64.b64encode(value).decode("ascii")
    )
    return SignedManifest(manifest=manifest, signature=signature)


def verify(signed: SignedManifest, trusted: dict[str, Ed25519PublicKey]) -> None:
    """Raise UnknownKeyError or SignatureError; return quietly when the signature holds."""
    manifest, signature = signed.manifest, signed.signature
    public_key = trusted.get(signature.key_id)
    if public_key is None:
        directory = getattr(trusted, "directory", None)
        where = f" in {directory}" if directory is not None else ""
        raise UnknownKeyError(
            f"manifest {manifest.model_id} is signed by key {signature.key_id}, which is not "
            f"among the {len(trusted)} trusted keys{where}; add its .pub file to trust it"
        )
    raw = _decode(signature.value, manifest.model_id)
    digest = manifest.digest()
    try:
        public_key.verify(raw, bytes.fromhex(digest))
    except InvalidSignature:
        raise SignatureError(
            f"manifest {manifest.model_id} changed after it was signed (digest now {digest}); "
            "re-sign it or restore it"
        ) from None


def _decode(value: str, model_id: str) -> bytes:
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError(
            f"the signature of manifest {model_id} is not valid base64; re-sign the manifest"
        ) from None
    if len(raw) != SIGNATURE_BYTES:
        raise SignatureError(
            f"the signature of manifest {model_id} is {len(raw)} bytes, an ed25519 signature is "
            f"{SIGNATURE_BYTES}; re-sign the manifest"
        )
    return raw


def write_signed(signed: SignedManifest, path: Path) -> None:
    """JSON for `.json`, YAML otherwise (what `loading.load_signed_manifest` reads back)."""
    data = signed.model_dump(mode="json")
    if path.suffix == ".json":
        text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    else:
        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
