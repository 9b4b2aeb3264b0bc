"""A manifest's artifact (`adapter_uri`): the signature vouches for its bytes, not only its name.

`canaryflow sign` reads the artifact and records its sha256 and size in the manifest
(`adapter_sha256`, `adapter_bytes`) before signing, so the signature covers them. Publishing
reads it again and refuses, before anything is written to the registry, an artifact that is
missing, unreadable or not the one that was signed; `canaryflow verify-artifact` repeats the
check for a published version.

Artifacts are read as streams in fixed-size chunks, so memory stays bounded whatever their size.
Local artifacts are absolute paths or `file://` URIs; `s3://bucket/key` goes through boto3 with
its usual configuration (credentials, region and `AWS_ENDPOINT_URL` for S3-compatible stores).
When S3 holds a full-object SHA-256 checksum it must agree with the bytes read, but it never
replaces reading them.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from canaryflow.contracts import ModelManifest, PublishedVersion
from canaryflow.errors import ArtifactChanged, ArtifactError, TransientArtifactError

CHUNK_BYTES = 1 << 20
RESIGN = "re-sign the manifest for the new one (`canaryflow sign` records its digest)"
S3_MISSING = {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}
S3_TRANSIENT = {"500", "502", "503", "504", "SlowDown", "InternalError", "ServiceUnavailable"}


@dataclass(frozen=True)
class ArtifactDigest:
    """What was read: the artifact's URI, the sha256 of its bytes and how many there were."""

    uri: str
    sha256: str
    size: int


def digest_stream(read: Callable[[int], bytes], chunk_bytes: int = CHUNK_BYTES) -> tuple[str, int]:
    """sha256 and length of a stream, read `chunk_bytes` at a time until `read` returns b''."""
    hasher, size = hashlib.sha256(), 0
    while chunk := read(chunk_bytes):
        hasher.update(chunk)
        size += len(chunk)
    return hasher.hexdigest(), size


def digest_file(
    path: Path, uri: str | None = None, chunk_bytes: int = CHUNK_BYTES
) -> ArtifactDigest:
    """Hash a local file through one reused buffer (no chunk is kept past its update)."""
    uri = uri or str(path)
    if path.is_dir():
        raise ArtifactError(
            f"artifact {uri} is a directory; package the adapter as one file (a .tar or "
            ".safetensors), point adapter_uri at it and re-sign the manifest"
        )
    hasher, size = hashlib.sha256(), 0
    buffer = bytearray(chunk_bytes)
    view = memoryview(buffer)
    try:
        with path.open("rb", buffering=0) as handle:
            while count := handle.readinto(buffer):
                hasher.update(view[:count])
                size += count
    except FileNotFoundError:
        raise _missing(uri) from None
    except OSError as exc:
        raise _unreadable(uri, exc.strerror or str(exc)) from exc
    return ArtifactDigest(uri, hasher.hexdigest(), size)


def local_path(uri: str) -> Path | None:
    """The path of a local artifact, None for another scheme; relative paths are refused (the
    process that publishes may not share the signer's working directory)."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ArtifactError(
                f"artifact {uri} names host {parsed.netloc!r}; write a local file as "
                "file:///absolute/path, or upload it to S3"
            )
        return Path(unquote(parsed.path))
    if parsed.scheme:
        return None
    path = Path(uri).expanduser()
    if not path.is_absolute():
        raise ArtifactError(
            f"artifact {uri} is a relative path; write it absolute (or as file:///...) and "
            "re-sign the manifest, since the worker that publishes may run elsewhere"
        )
    return path


def s3_location(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    key = parsed.path.lstrip("/")
    if not parsed.netloc or not key:
        raise ArtifactError(f"artifact {uri} is not s3://bucket/key; correct adapter_uri")
    return parsed.netloc, key


def s3_client() -> Any:
    """boto3's default chain: credentials, region and endpoint from the environment/config."""
    import boto3

    return boto3.client("s3")


def digest_s3(
    uri: str,
    client: Any | None = None,
    expected_size: int | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> ArtifactDigest:
    """Stream the object through the hash. A size other than `expected_size` is refused from
    the response headers, before the body is read."""
    bucket, key = s3_location(uri)
    client = client or s3_client()
    with _s3_errors(uri):
        response = client.get_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
        body = response["Body"]
        try:
            length = int(response.get("ContentLength", -1))
            if expected_size is not None and length >= 0 and length != expected_size:
                raise _changed(uri, f"{length} bytes", f"{expected_size}")
            sha256, size = digest_stream(body.read, chunk_bytes)
        finally:
            body.close()
    if length >= 0 and size != length:
        raise TransientArtifactError(
            f"artifact {uri} ended after {size} of its {length} bytes; the read was cut short, "
            "publish again"
        )
    reported = response.get("ChecksumSHA256")
    full_object = response.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT"
    if reported and full_object and "-" not in reported:
        ours = base64.b64encode(bytes.fromhex(sha256)).decode("ascii")
        if reported != ours:
            raise ArtifactError(
                f"artifact {uri} read as sha256 {sha256}, but S3 stores checksum {reported} for "
                "it; the object or the read is corrupt: upload it again, then publish again"
            )
    return ArtifactDigest(uri, sha256, size)


def digest_uri(uri: str, expected_size: int | None = None) -> ArtifactDigest:
    """Read the artifact at `uri` (local path, file:// or s3://) and hash it."""
    if urlparse(uri).scheme == "s3":
        return digest_s3(uri, expected_size=expected_size)
    path = local_path(uri)
    if path is None:
        raise ArtifactError(
            f"artifact {uri}: canaryflow reads local paths, file:// and s3:// URIs; copy it to "
            "one of those, point adapter_uri at it and re-sign the manifest"
        )
    if expected_size is not None:
        size = _local_size(path, uri)
        if size != expected_size:
            raise _changed(uri, f"{size} bytes", f"{expected_size}")
    return digest_file(path, uri)


def record_artifact(manifest: ModelManifest) -> ModelManifest:
    """The manifest to sign: with the artifact's sha256 and size, read now. A manifest that
    already carries them must still match its artifact."""
    if manifest.adapter_uri is None:
        return manifest
    if manifest.adapter_sha256 is not None:
        check_artifact(manifest)
        return manifest
    found = digest_uri(manifest.adapter_uri)
    fields = manifest.model_dump()
    fields.update(adapter_sha256=found.sha256, adapter_bytes=found.size)
    return ModelManifest.model_validate(fields)


def check_artifact(manifest: ModelManifest) -> ArtifactDigest | None:
    """Refuse (ArtifactError) unless the artifact is there and is the one the manifest's
    signature covers; None for a manifest without an artifact."""
    uri = manifest.adapter_uri
    if uri is None:
        return None
    if manifest.adapter_sha256 is None or manifest.adapter_bytes is None:
        raise ArtifactError(
            f"manifest {manifest.model_id} names artifact {uri}, but its signature covers no "
            "digest of it; sign it again with `canaryflow sign`, which records the artifact's "
            "sha256 and size"
        )
    found = digest_uri(uri, expected_size=manifest.adapter_bytes)
    if found.sha256 != manifest.adapter_sha256:
        raise _changed(uri, f"sha256 {found.sha256}", manifest.adapter_sha256)
    if found.size != manifest.adapter_bytes:
        raise _changed(uri, f"{found.size} bytes", str(manifest.adapter_bytes))
    return found


def _changed(uri: str, actual: str, expected: str) -> ArtifactChanged:
    return ArtifactChanged(
        f"artifact {uri} changed since it was signed: {actual}, manifest says {expected}; "
        f"restore the signed artifact, or {RESIGN}"
    )


def _missing(uri: str, detail: str = "") -> ArtifactError:
    return ArtifactError(
        f"artifact {uri} does not exist{detail}; put the artifact there, or correct adapter_uri "
        "and re-sign the manifest"
    )


def _unreadable(uri: str, reason: str) -> ArtifactError:
    return ArtifactError(
        f"artifact {uri} cannot be read ({reason}); give this process read access to it, "
        "then publish again"
    )


def _local_size(path: Path, uri: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        raise _missing(uri) from None
    except OSError as exc:
        raise _unreadable(uri, exc.strerror or str(exc)) from exc


@contextlib.contextmanager
def _s3_errors(uri: str) -> Iterator[None]:
    """botocore's errors as the module's: missing, unreadable, or worth a retry."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectionError,
        NoCredentialsError,
        ReadTimeoutError,
    )

    try:
        yield
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        if code in S3_MISSING or status == "404":
            raise _missing(uri, f" ({code or status})") from exc
        if code in S3_TRANSIENT or status in S3_TRANSIENT:
            raise TransientArtifactError(
                f"artifact {uri}: S3 did not answer ({code or status}); publish again once it "
                "is back"
            ) from exc
        raise _unreadable(uri, f"{code or status}: {error.get('Message', '')}") from exc
    except NoCredentialsError as exc:
        raise _unreadable(uri, "no AWS credentials in this process") from exc
    except (ConnectionError, ReadTimeoutError) as exc:
        raise TransientArtifactError(
            f"artifact {uri}: S3 unreachable ({exc}); publish again once it is back"
        ) from exc
    except BotoCoreError as exc:
        raise _unreadable(uri, str(exc)) from exc


def verify_published(published: PublishedVersion) -> ArtifactDigest | None:
    """A published version's artifact against what its signed manifest recorded (pass a
    version loaded with `verify_with`, so the digest itself is known to be signed); its tags
    must say the same. None when the version has no artifact."""
    manifest, where = published.signed.manifest, f"{published.service} v{published.version}"
    recorded = {
        "canaryflow.adapter_sha256": manifest.adapter_sha256,
        "canaryflow.adapter_bytes": None
        if manifest.adapter_bytes is None
        else str(manifest.adapter_bytes),
    }
    for tag, signed in recorded.items():
        if signed is not None and published.tags.get(tag) != signed:
            raise ArtifactChanged(
                f"{where}: tag {tag} says {published.tags.get(tag)!r}, its signed manifest says "
                f"{signed}; set the tag back to the signed value"
            )
    return check_artifact(manifest)
