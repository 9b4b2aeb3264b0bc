"""The MLflow model registry: one registered model per service, one version per release.

A version's source is its external LoggedModel (`models:/<model_id>`, see `conventions`) over a
run in experiment `canaryflow-registry` holding the signed manifest as JSON; its tags carry the
digest, the signature, the release status and the Prompt Registry URI of its template, and its
aliases say who serves: `champion` (stable), `challenger` (in shadow/canary), `last-stable` (kept
warm for rollback). Publishing is idempotent on the manifest digest (the version, its run and its
LoggedModel are all found again by it), so a retried task never makes a second one, and reading
a version back re-checks the digest, so an artifact edited inside the registry is caught as
tampering. A manifest naming a model artifact (`adapter_uri`) is published only once the
artifact has been read and found to be the one signed (`registry.artifacts`)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from canaryflow.contracts import (
    STATUSES,
    CompatibilityReport,
    ModelManifest,
    PublishedVersion,
    SignedManifest,
    Status,
)
from canaryflow.errors import AliasNotFound, RegistryError, SignatureError
from canaryflow.registry import conventions
from canaryflow.registry.artifacts import check_artifact
from canaryflow.registry.conventions import (
    TAG_DIGEST,
    TAG_LOGGED_MODEL,
    TAG_MANIFEST_URI,
    TAG_MODEL_ID,
    TAG_PROMPT_URI,
    TAG_TEMPLATE_HASH,
)
from canaryflow.registry.mlflow_client import NOT_FOUND, MlflowConnection, error_code, mlflow_errors
from canaryflow.registry.signing import TrustedKeys, verify

if TYPE_CHECKING:
    from mlflow.entities import LoggedModel
    from mlflow.entities.model_registry import ModelVersion, PromptVersion


EXPERIMENT = "canaryflow-registry"
ARTIFACT_DIR = "manifest"
ARTIFACT_FILE = "signed_manifest.json"
MANIFEST_PATH = f"{ARTIFACT_DIR}/{ARTIFACT_FILE}"
CHAMPION, CHALLENGER, LAST_STABLE = "champion", "challenger", "last-stable"

TAG_KEY_ID = "canaryflow.key_id"
TAG_SIGNATURE = "canaryflow.signature"
TAG_STATUS = "canaryflow.status"
TAG_STATUS_REASON = "canaryflow.status_reason"
TAG_EVAL_URI = "canaryflow.eval_uri"
TAG_PROVIDER = "canaryflow.provider"
TAG_PROVIDER_MODEL = "canaryflow.provider_model"
TAG_PREVIOUS_CHAMPION = "canaryflow.previous_champion"
TAG_RESTORED_FROM = "canaryflow.restored_from"
TAG_ADAPTER_URI = "canaryflow.adapter_uri"
TAG_ADAPTER_SHA256 = "canaryflow.adapter_sha256"
TAG_ADAPTER_BYTES = "canaryflow.adapter_bytes"


def check_compatibility(candidate: ModelManifest, champion: ModelManifest) -> CompatibilityReport:
    """What would break clients or policy if the candidate replaced the champion."""
    problems = []
    for field in ("tokenizer_version", "embedding_version"):
        old, new = getattr(champion, field), getattr(candidate, field)
        if old != new:
            problems.append(
                f"{field} changes from {old!r} to {new!r}: stored token counts or embeddings "
                "would no longer match; release it as a migration (allow_incompatible)"
            )
    extra = sorted(set(candidate.data_residency) - set(champion.data_residency))
    if extra:
        problems.append(
            f"data_residency adds {extra} beyond the champion's "
            f"{sorted(champion.data_residency)}: data would leave its allowed regions"
        )
    if candidate.license != champion.license:
        problems.append(
            f"license changes from {champion.license!r} to {candidate.license!r}: "
            "have the new license reviewed before release"
        )
    return CompatibilityReport(compatible=not problems, problems=tuple(problems))


class MlflowRegistry(MlflowConnection):
    def __init__(self, tracking_uri: str) -> None:
        super().__init__(tracking_uri)
        self._known_models: set[str] = set()

    # ------------------------------------------------------------------ versions

    def publish(
        self, signed: SignedManifest, verify_with: TrustedKeys | None = None
    ) -> PublishedVersion:
        """Register the signed manifest as a new version, or return the one with its digest.

        Its artifact, if it names one, is read first: missing, unreadable or changed since
        signing is refused (ArtifactError) before anything is written."""
        if verify_with is not None:
            verify(signed, verify_with)
        manifest = signed.manifest
        check_artifact(manifest)
        service, digest = manifest.service, manifest.digest()
        with mlflow_errors(f"publishing {manifest.model_id}"):
            existing = self.client.search_model_versions(
                f"name = '{service}' and tags.`{TAG_DIGEST}` = '{digest}'"
            )
            if existing:
                found = self.get(service, str(existing[0].version), verify_with)
                return found.model_copy(update={"created": False})
            self._ensure_model(service)
            experiment_id = self.experiment_id(EXPERIMENT)
            assert experiment_id is not None
            prompt = conventions.register_prompt(self.client, manifest)
            model = conventions.find_logged_model(self.client, experiment_id, digest)
            if model is None:
                model = self._new_logged_model(experiment_id, signed, prompt)
            else:  # an earlier attempt stopped before registering: reuse its run and model
                model = conventions.ready(self.client, model)
            tags = {
                **_version_tags(signed, digest),
                TAG_MANIFEST_URI: model.tags[TAG_MANIFEST_URI],
                TAG_LOGGED_MODEL: model.model_id,
            }
            if prompt is not None:
                tags[TAG_PROMPT_URI] = prompt.uri
            version = self.client.create_model_version(
                service,
                source=f"models:/{model.model_id}",
                run_id=model.source_run_id,
                tags=tags,
                description=manifest.model_id,
                await_creation_for=0,
                model_id=model.model_id,
            )
        return _published(version, signed, created=True)

    def _new_logged_model(
        self, experiment_id: str, signed: SignedManifest, prompt: PromptVersion | None
    ) -> LoggedModel:
        """The run holding the signed manifest (what `get` reads back and checks), then the
        LoggedModel over it; a failure here leaves no registered version."""
        manifest = signed.manifest
        run = self.client.create_run(
            experiment_id,
            run_name=manifest.model_id,
            tags={TAG_DIGEST: manifest.digest(), "canaryflow.service": manifest.service},
        )
        run_id = run.info.run_id
        self.client.log_dict(run_id, signed.model_dump(mode="json"), MANIFEST_PATH)
        self.client.set_terminated(run_id)
        manifest_uri = f"{run.info.artifact_uri}/{MANIFEST_PATH}"
        return conventions.create_logged_model(
            self.client, experiment_id, run_id, manifest_uri, manifest, prompt
        )

    def get(
        self,
        service: str,
        version: str,
        verify_with: TrustedKeys | None = None,
    ) -> PublishedVersion:
        with mlflow_errors(f"reading {service} version {version}"):
            found = self.client.get_model_version(service, version)
        return self._load(found, verify_with)

    def resolve(
        self,
        service: str,
        alias: str,
        verify_with: TrustedKeys | None = None,
    ) -> PublishedVersion:
        from mlflow.exceptions import MlflowException

        with mlflow_errors(f"resolving {service}@{alias}"):
            try:
                found = self.client.get_model_version_by_alias(service, alias)
            except MlflowException as exc:
                if error_code(exc) not in NOT_FOUND:
                    raise
                raise AliasNotFound(
                    f"service {service} has no version with alias {alias!r} yet "
                    f"(aliases now: {self.aliases(service) or 'none'}); publish a version and "
                    f"promote it, or set the alias with `set_alias({service!r}, {alias!r}, V)`"
                ) from exc
        return self._load(found, verify_with)

    def _load(self, found: ModelVersion, verify_with: TrustedKeys | None) -> PublishedVersion:
        where = f"{found.name} version {found.version}"
        if not found.run_id:
            raise RegistryError(f"{where} was not published by canaryflow (it has no run)")
        with mlflow_errors(f"downloading the manifest of {where}"):
            text = self._read_manifest(found)
        try:
            signed = SignedManifest.model_validate(json.loads(text))
        except (ValueError, ValidationError) as exc:
            raise SignatureError(
                f"the stored manifest of {where} no longer validates ({exc}); it was altered in "
                "the registry: publish it again from the signed file"
            ) from exc
        published_as = (found.tags or {}).get(TAG_DIGEST)
        digest = signed.manifest.digest()
        if digest != published_as:
            raise SignatureError(
                f"manifest {signed.manifest.model_id} ({where}) changed in the registry after it "
                f"was published (digest now {digest}, published as {published_as}); "
                "publish it again from the signed file"
            )
        if verify_with is not None:
            verify(signed, verify_with)
        return _published(found, signed, created=False)

    def _read_manifest(self, found: ModelVersion) -> str:
        """Through the URI tag: 3 requests, where `download_artifacts(run_id)` takes 5."""
        import mlflow.artifacts

        uri = (found.tags or {}).get(TAG_MANIFEST_URI)
        with tempfile.TemporaryDirectory() as tmp:
            if uri:
                path = mlflow.artifacts.download_artifacts(
                    artifact_uri=uri, dst_path=tmp, tracking_uri=self.tracking_uri
                )
            else:
                path = self.client.download_artifacts(str(found.run_id), MANIFEST_PATH, tmp)
            return Path(path).read_text()

    def _ensure_model(self, service: str) -> None:
        from mlflow.exceptions import MlflowException

        if service in self._known_models:
            return
        try:
            self.client.create_registered_model(
                service, description=f"canaryflow releases of service {service}"
            )
        except MlflowException as exc:
            if error_code(exc) != "RESOURCE_ALREADY_EXISTS":
                raise
        self._known_models.add(service)

    # ------------------------------------------------------------------ tags and aliases

    def aliases(self, service: str) -> dict[str, str]:
        from mlflow.exceptions import MlflowException

        with mlflow_errors(f"reading the aliases of {service}"):
            try:
                model = self.client.get_registered_model(service)
            except MlflowException as exc:
                if error_code(exc) != "RESOURCE_DOES_NOT_EXIST":
                    raise
                return {}
        return {alias: str(version) for alias, version in (model.aliases or {}).items()}

    def set_alias(self, service: str, alias: str, version: str) -> None:
        with mlflow_errors(f"pointing {service}@{alias} at version {version}"):
            self.writer.set_registered_model_alias(service, alias, version)

    def delete_alias(self, service: str, alias: str) -> None:
        """Idempotent: deleting an alias that is already gone is fine."""
        from mlflow.exceptions import MlflowException

        with mlflow_errors(f"deleting {service}@{alias}"):
            try:
                self.writer.delete_registered_model_alias(service, alias)
            except MlflowException as exc:
                if error_code(exc) not in NOT_FOUND:
                    raise

    def set_tags(self, service: str, version: str, tags: dict[str, str]) -> None:
        with mlflow_errors(f"tagging {service} version {version}"):
            for key, value in tags.items():
                self.writer.set_model_version_tag(service, version, key, value)

    def set_status(self, service: str, version: str, status: Status, reason: str = "") -> None:
        if status not in STATUSES:
            raise ValueError(f"status {status!r} is not one of {', '.join(STATUSES)}")
        # The reason is always written so that an old reason never outlives its status.
        self.set_tags(service, version, {TAG_STATUS: status, TAG_STATUS_REASON: reason})

    @staticmethod
    def check_compatibility(
        candidate: ModelManifest, champion: ModelManifest
    ) -> CompatibilityReport:
        return check_compatibility(candidate, champion)

    # ------------------------------------------------------------------ release moves

    def start_challenger(self, service: str, version: str) -> str | None:
        """Point `challenger` at the version; returns the champion it challenges (if any)."""
        champion = self.aliases(service).get(CHAMPION)
        self.set_alias(service, CHALLENGER, version)
        if champion is not None and champion != version:
            self.set_tags(service, version, {TAG_PREVIOUS_CHAMPION: champion})
        return champion

    def promote(self, service: str, version: str) -> str | None:
        """champion -> version, old champion -> last-stable; returns the old champion.

        Safe to repeat: a second call finds the version already champion and changes nothing
        but the status, returning the same old champion.
        """
        aliases = self.aliases(service)
        old = aliases.get(CHAMPION)
        if old == version:
            old = aliases.get(LAST_STABLE)
        elif old is not None:
            # last-stable first: a crash in between leaves the old champion serving.
            self.set_alias(service, LAST_STABLE, old)
            self.set_tags(service, version, {TAG_PREVIOUS_CHAMPION: old})
        self.set_alias(service, CHAMPION, version)
        if CHALLENGER in aliases:
            self.delete_alias(service, CHALLENGER)
        self.set_status(service, version, "promoted")
        return old

    def rollback(self, service: str, version: str, reason: str) -> str | None:
        """Mark the candidate rolled back; the champion keeps serving. Returns the champion."""
        self.set_status(service, version, "rolled_back", reason)
        aliases = self.aliases(service)
        if aliases.get(CHALLENGER) == version:
            self.delete_alias(service, CHALLENGER)
        return aliases.get(CHAMPION)

    def rollback_to(
        self, service: str, target: str | None = None, reason: str = "on-demand rollback"
    ) -> str:
        """Make `target` (default: the `last-stable` version) the champion again."""
        aliases = self.aliases(service)
        if target is None:
            target = aliases.get(LAST_STABLE)
            if target is None:
                raise AliasNotFound(
                    f"service {service} has no 'last-stable' version to roll back to "
                    f"(aliases now: {aliases or 'none'}); name the target version explicitly"
                )
        else:
            with mlflow_errors(f"reading {service} version {target}"):
                self.client.get_model_version(service, target)
        current = aliases.get(CHAMPION)
        if current == target:
            return target
        self.set_alias(service, CHAMPION, target)
        if current is not None:
            self.set_status(service, current, "rolled_back", f"{reason} (to version {target})")
        self.set_tags(service, target, {TAG_RESTORED_FROM: current or ""})
        self.set_status(service, target, "promoted", reason)
        return target


def _version_tags(signed: SignedManifest, digest: str) -> dict[str, Any]:
    manifest = signed.manifest
    tags = {
        TAG_DIGEST: digest,
        TAG_KEY_ID: signed.signature.key_id,
        TAG_SIGNATURE: signed.signature.value,
        TAG_MODEL_ID: manifest.model_id,
        TAG_STATUS: "published",
        TAG_PROVIDER: manifest.origin.provider,
        TAG_PROVIDER_MODEL: manifest.origin.model,
        TAG_TEMPLATE_HASH: manifest.prompt_template_hash or "",
    }
    if manifest.eval_uri:
        tags[TAG_EVAL_URI] = manifest.eval_uri
    if manifest.adapter_uri is not None and manifest.adapter_sha256 is not None:
        tags[TAG_ADAPTER_URI] = manifest.adapter_uri
        tags[TAG_ADAPTER_SHA256] = manifest.adapter_sha256
        tags[TAG_ADAPTER_BYTES] = str(manifest.adapter_bytes)
    return tags


def _published(found: ModelVersion, signed: SignedManifest, created: bool) -> PublishedVersion:
    tags = {str(k): str(v) for k, v in (found.tags or {}).items()}
    status = tags.get(TAG_STATUS, "published")
    if status not in STATUSES:
        raise RegistryError(
            f"{found.name} version {found.version} has status tag {status!r}, not one of "
            f"{', '.join(STATUSES)}; fix the tag {TAG_STATUS}"
        )
    return PublishedVersion(
        service=found.name,
        version=str(found.version),
        signed=signed,
        digest=signed.manifest.digest(),
        status=status,  # type: ignore[arg-type]
        tags=tags,
        aliases=tuple(found.aliases or ()),
        created=created,
        run_id=str(found.run_id),
    )
