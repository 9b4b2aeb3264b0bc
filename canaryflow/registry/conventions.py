"""MLflow 3's shapes for a release: a LoggedModel per version, its prompt in the Prompt Registry.

A canaryflow version is a provider's model plus a prompt template, so its LoggedModel is an
external one (no weights in MLflow): named after the service, tagged with the manifest digest so a
retried publish finds it again, with the manifest's description as params (never a key or a
signature). The registered version's source is `models:/<model_id>`, which is how MLflow links the
two (the server then lists the version in the model's `mlflow.modelVersions` tag).

The template goes to the Prompt Registry as `<service>-prompt`, one prompt version per distinct
template (found again by its hash), written in MLflow's `{{input}}` syntax so that
`load_prompt(uri).format(input=x)` renders what the service sends. A server without the Prompt
Registry (or refusing the name) only costs the link: the template stays in the signed manifest,
which is what the release runs on, and a warning says so. MLflow down is not that case: it is a
TransientRegistryError, retried like the rest of the publish.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, cast

from canaryflow.contracts import ModelManifest, PublishedVersion
from canaryflow.errors import RegistryError, TransientRegistryError
from canaryflow.registry.mlflow_client import mlflow_errors

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModel
    from mlflow.entities.model_registry import PromptVersion

log = logging.getLogger(__name__)

PROMPT_SUFFIX = "-prompt"
MODEL_TYPE = "llm"
TAG_DIGEST = "canaryflow.digest"
TAG_SERVICE = "canaryflow.service"
TAG_MODEL_ID = "canaryflow.model_id"
TAG_MANIFEST_URI = "canaryflow.manifest_uri"
TAG_TEMPLATE_HASH = "canaryflow.template_hash"
TAG_LOGGED_MODEL = "canaryflow.logged_model_id"
TAG_PROMPT_URI = "canaryflow.prompt_uri"
IS_EXTERNAL = "mlflow.model.isExternal"
LINKED_PROMPTS = "mlflow.linkedPrompts"


def prompt_name(service: str) -> str:
    return f"{service}{PROMPT_SUFFIX}"


def mlflow_template(template: str) -> str:
    """canaryflow's `{input}` as MLflow's `{{input}}`; every other character is kept."""
    return template.replace("{input}", "{{input}}")


def logged_model_id(published: PublishedVersion) -> str | None:
    """The LoggedModel of a published version; None for versions published before they had one."""
    return published.tags.get(TAG_LOGGED_MODEL) or None


def register_prompt(client: MlflowClient, manifest: ModelManifest) -> PromptVersion | None:
    """The prompt version holding this template: an existing one with its hash, else a new one.

    None when the server refuses prompts (no Prompt Registry, or the name is taken by a model);
    MLflow unreachable or 5xx raises TransientRegistryError, so publish is retried."""
    from mlflow.exceptions import MlflowException

    name = prompt_name(manifest.service)
    template_hash = manifest.prompt_template_hash or ""
    try:
        with mlflow_errors(f"registering prompt {name}"):
            try:
                found = _version_with_hash(client, name, template_hash)
            except MlflowException as exc:
                if getattr(exc, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                    raise
                found = None
            if found is not None:
                return found
            created: PromptVersion = client.register_prompt(
                name,
                mlflow_template(manifest.prompt_template),
                commit_message=f"template of {manifest.model_id}",
                tags={TAG_TEMPLATE_HASH: template_hash, TAG_SERVICE: manifest.service},
            )
            return created
    except TransientRegistryError:
        raise
    except RegistryError as exc:  # any refusal: publish without the prompt link
        log.warning(
            "prompt template of %s not registered in the MLflow Prompt Registry as %s (%s); "
            "publishing without the prompt link, the template stays in the signed manifest",
            manifest.model_id,
            name,
            exc,
        )
        return None


def _version_with_hash(client: MlflowClient, name: str, template_hash: str) -> PromptVersion | None:
    """Every page: an old template brought back reuses its old prompt version."""
    token: str | None = None
    while True:
        page = client.search_prompt_versions(name, page_token=token)
        for version in page:
            if (version.tags or {}).get(TAG_TEMPLATE_HASH) == template_hash:
                return cast("PromptVersion", version)
        token = page.token
        if not token:
            return None


def find_logged_model(client: MlflowClient, experiment_id: str, digest: str) -> LoggedModel | None:
    """The LoggedModel an earlier attempt at publishing this manifest created, if any."""
    found = client.search_logged_models(
        [experiment_id], filter_string=f"tags.`{TAG_DIGEST}` = '{digest}'", max_results=1
    )
    return found[0] if found else None


def create_logged_model(
    client: MlflowClient,
    experiment_id: str,
    run_id: str,
    manifest_uri: str,
    manifest: ModelManifest,
    prompt: PromptVersion | None,
) -> LoggedModel:
    """An external LoggedModel for the version, READY at once (its artifacts live elsewhere)."""
    digest = manifest.digest()
    tags = {
        TAG_DIGEST: digest,
        TAG_SERVICE: manifest.service,
        TAG_MODEL_ID: manifest.model_id,
        TAG_MANIFEST_URI: manifest_uri,
        IS_EXTERNAL: "true",
    }
    if prompt is not None:
        tags[TAG_PROMPT_URI] = prompt.uri
        # The format MLflow's own link_prompt_version_to_model writes (that helper goes through
        # the process-wide tracking store, not this client's server).
        tags[LINKED_PROMPTS] = json.dumps([{"name": prompt.name, "version": str(prompt.version)}])
    model = client.create_logged_model(
        experiment_id,
        name=manifest.service,
        source_run_id=run_id,
        tags=tags,
        params=model_params(manifest, digest),
        model_type=MODEL_TYPE,
    )
    return ready(client, model)


def ready(client: MlflowClient, model: LoggedModel) -> LoggedModel:
    """Finalize a model left PENDING (by a crash right after its creation, or just now)."""
    from mlflow.entities import LoggedModelStatus

    if model.status == LoggedModelStatus.READY:
        return model
    return client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)


def model_params(manifest: ModelManifest, digest: str) -> dict[str, str]:
    """What the model is, as MLflow params: the manifest's description, nothing secret."""
    params = {
        "model_id": manifest.model_id,
        "provider": manifest.origin.provider,
        "model": manifest.origin.model,
        "manifest_digest": digest,
        "prompt_template_hash": manifest.prompt_template_hash or "",
        "temperature": str(manifest.parameters.temperature),
        "top_p": str(manifest.parameters.top_p),
        "max_tokens": str(manifest.parameters.max_tokens),
        "tokenizer_version": manifest.tokenizer_version,
        "embedding_version": manifest.embedding_version,
        "license": manifest.license,
    }
    if manifest.adapter_uri is not None:
        params["adapter_uri"] = manifest.adapter_uri
        params["adapter_sha256"] = manifest.adapter_sha256 or ""
    return params
