"""Ed25519 signatures over manifest digests: nothing moves traffic unless a trusted key signed it.

The signed message is the raw 32-byte sha256 digest of the manifest's canonical JSON
(`bytes.fromhex(manifest.digest())`), so any change to any field breaks the signature.
A key is named by `key_id`: the first 16 hex digits of sha256 over its raw 32-byte public key.

A trusted key signs only for the services it is bound to: beside `<name>.pub` in the trusted keys
folder, `<name>.services` lists them, one a line (`#` starts a comment), or holds `*` for every
service. A key without that file, or with an empty one, may sign for no service: a missing
binding never widens trust. `canaryflow keys --service NAME` writes the file with the key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from canaryflow.contracts import ModelManifest, Signature, SignedManifest
from canaryflow.errors import ConfigError, SignatureError, UnknownKeyError

SIGNATURE_BYTES = 64
SERVICES_SUFFIX = ".services"
ANY_SERVICE = "*"


class KeyNotAllowedError(UnknownKeyError):
    """A trusted key signed for a service it is not bound to (or it is bound to none)."""


@dataclass(frozen=True)
class KeyPair:
    private_path: Path
    public_path: Path
    key_id: str
    services_path: Path | None = None


class TrustedKeys(dict[str, Ed25519PublicKey]):
    """key id -> public key, with each key's bound services (None: no binding file) and the
    file it came from, for the binding check and for error messages."""

    def __init__(
        self,
        keys: dict[str, Ed25519PublicKey] | None = None,
        directory: Path | None = None,
        services: Mapping[str, frozenset[str] | None] | None = None,
        files: Mapping[str, Path] | None = None,
    ) -> None:
        super().__init__(keys or {})
        self.directory = directory
        self.services: dict[str, frozenset[str] | None] = dict(services or {})
        self.files: dict[str, Path] = dict(files or {})

    def services_of(self, key: str) -> frozenset[str] | None:
        """The services `key` may sign for; None when it has no binding (it may sign for none)."""
        return self.services.get(key)


def services_path(public_path: Path) -> Path:
    """`<name>.services` beside `<name>.pub`."""
    return public_path.with_suffix(SERVICES_SUFFIX)


def check_services(services: Iterable[str]) -> tuple[str, ...]:
    """Service names a key may sign for, as written to its binding file; `*` alone means all."""
    names = tuple(dict.fromkeys(s.strip() for s in services))
    if not names:
        raise ConfigError(
            "name the services this key may sign for (--service NAME, repeatable), "
            f"or {ANY_SERVICE!r} for every service"
        )
    for name in names:
        if not name or any(c.isspace() for c in name) or "#" in name:
            raise ConfigError(
                f"{name!r} is not a service name: no blanks, no '#'; "
                f"use {ANY_SERVICE!r} alone for every service"
            )
    if ANY_SERVICE in names and len(names) > 1:
        raise ConfigError(
            f"{ANY_SERVICE!r} already allows every service: give either {ANY_SERVICE!r} or "
            f"service names, not both (got {', '.join(names)})"
        )
    return names


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(directory: Path, name: str, services: Iterable[str]) -> KeyPair:
    """Write `<name>.key` (0600), `<name>.pub` and `<name>.services` (the services the key may
    sign for, `*` for all); an existing key is never overwritten."""
    bound = check_services(services)
    private_path, public_path = directory / f"{name}.key", directory / f"{name}.pub"
    binding_path = services_path(public_path)
    for path in (private_path, public_path, binding_path):
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
    identity = key_id(private_key.public_key())
    fd = os.open(binding_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w") as text:
        text.write(
            f"# services key {name} ({identity}) may sign manifests for: one a line, "
            f"{ANY_SERVICE} for every service\n" + "".join(f"{service}\n" for service in bound)
        )
    return KeyPair(private_path, public_path, identity, binding_path)


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


def read_services(path: Path) -> frozenset[str] | None:
    """A key's binding file: None when there is none; `#` comments and blank lines skipped."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the key binding {path}: {exc}") from exc
    names = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    names = [name for name in names if name]
    try:
        return frozenset(check_services(names)) if names else frozenset()
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def load_trusted_keys(directory: Path) -> TrustedKeys:
    """Every `*.pub` in the directory with its `.services` binding; a file that is not an
    ed25519 key is an error, and so is one key in two files with different bindings."""
    if not directory.is_dir():
        raise ConfigError(
            f"trusted keys directory {directory} does not exist; "
            "create it and copy the signers' .pub and .services files into it"
        )
    keys: dict[str, Ed25519PublicKey] = {}
    services: dict[str, frozenset[str] | None] = {}
    files: dict[str, Path] = {}
    for path in sorted(directory.glob("*.pub")):
        public_key = load_public_key(path)
        identity = key_id(public_key)
        bound = read_services(services_path(path))
        if identity in keys and services[identity] != bound:
            raise ConfigError(
                f"key {identity} is in both {files[identity]} and {path} with different "
                "service bindings; keep one file per key"
            )
        keys[identity], services[identity], files[identity] = public_key, bound, path
    return TrustedKeys(keys, directory, services, files)


def sign(manifest: ModelManifest, private_key_path: Path) -> SignedManifest:
    private_key = load_private_key(private_key_path)
    value = private_key.sign(bytes.fromhex(manifest.digest()))
    signature = Signature(
        key_id=key_id(private_key.public_key()), value=base64.b64encode(value).decode("ascii")
    )
    return SignedManifest(manifest=manifest, signature=signature)


def verify(signed: SignedManifest, trusted: TrustedKeys) -> None:
    """Raise UnknownKeyError, SignatureError or KeyNotAllowedError; return quietly when the
    signature holds and the key is bound to the manifest's service."""
    manifest, signature = signed.manifest, signed.signature
    public_key = trusted.get(signature.key_id)
    if public_key is None:
        directory = getattr(trusted, "directory", None)
        where = f" in {directory}" if directory is not None else ""
        raise UnknownKeyError(
            f"manifest {manifest.model_id} is signed by key {signature.key_id}, which is not "
            f"among the {len(trusted)} trusted keys{where}; to trust it, add its .pub file "
            f"and a {SERVICES_SUFFIX} file naming the services it may sign for"
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
    check_binding(signed, trusted)


def check_binding(signed: SignedManifest, trusted: TrustedKeys) -> None:
    """The signing key must be bound to the manifest's service (or explicitly to `*`).

    Checked after the signature, so the service named in the error is the one that was signed.
    """
    service, key = signed.manifest.service, signed.signature.key_id
    bound = trusted.services_of(key) if isinstance(trusted, TrustedKeys) else None
    if bound is not None and (ANY_SERVICE in bound or service in bound):
        return
    public = trusted.files.get(key) if isinstance(trusted, TrustedKeys) else None
    where = f" ({public})" if public is not None else ""
    binding = services_path(public) if public is not None else Path(f"<name>{SERVICES_SUFFIX}")
    how = (
        f"write the services it may sign for to {binding}, one a line, or {ANY_SERVICE!r} for "
        f"every service (`canaryflow keys --service {service}` writes it for a new key)"
    )
    if not bound:
        state = "has no service binding" if bound is None else "is bound to no service"
        raise KeyNotAllowedError(
            f"manifest {signed.manifest.model_id} is for service {service!r}, but key {key}"
            f"{where} {state}, so it may sign for none: to bind it, {how}"
        )
    raise KeyNotAllowedError(
        f"manifest {signed.manifest.model_id} is for service {service!r}, but key {key}{where} "
        f"may sign only for {', '.join(sorted(bound))}: sign it with a key bound to {service!r}, "
        f"or, if this key should release {service!r}, add it to {binding}"
    )


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
