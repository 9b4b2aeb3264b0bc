"""Model manifests: what a version is, and its signature."""

from __future__ import annotations

from datetime import datetime
from typing import Literal, get_args

from pydantic import Field, field_validator, model_validator

from canaryflow.contracts.base import MODEL_ID_PATTERN, Frozen, canonical_json, sha256_hex


class ModelId(Frozen):
    """`my-assistant/gemini-docs-v1.2+ds-20260112` split into its parts."""

    app: str
    model: str
    version: str
    dataset: str

    @classmethod
    def parse(cls, text: str) -> ModelId:
        match = MODEL_ID_PATTERN.match(text)
        if match is None:
            raise ValueError(
                f"model id {text!r} must look like 'app/model-vMAJOR.MINOR[.PATCH]+dataset', "
                "e.g. 'my-assistant/gemini-docs-v1.2+ds-20260112'"
            )
        return cls(**match.groupdict())


class Origin(Frozen):
    provider: str = Field(description="provider key in settings, e.g. 'sandbox', 'gemini'")
    model: str = Field(description="the provider's own model name")


class DecodingParameters(Frozen):
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(256, ge=1, le=32768)
    seed: int | None = None
    stop: tuple[str, ...] = ()


class Price(Frozen):
    """USD per 1,000 tokens."""

    input_per_1k: float = Field(ge=0.0)
    output_per_1k: float = Field(ge=0.0)

    def cost(self, tokens_in: int, tokens_out: int) -> float:
        return tokens_in / 1000 * self.input_per_1k + tokens_out / 1000 * self.output_per_1k


# Optional fields newer than the first signed manifests: absent from the canonical form when unset.
ADDED_LATER = ("adapter_sha256", "adapter_bytes")


class ModelManifest(Frozen):
    """An immutable, signable description of one model release."""

    model_id: str
    created_at: datetime
    origin: Origin
    adapter_uri: str | None = Field(
        None, description="the artifact (local path, file:// or s3:// URI), if the model has one"
    )
    adapter_sha256: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{64}$",
        description="sha256 of the artifact's bytes, recorded by `canaryflow sign`",
    )
    adapter_bytes: int | None = Field(None, ge=0, description="the artifact's size in bytes")
    prompt_template: str = Field(description="rendered with str.format(input=...)")
    prompt_template_hash: str | None = Field(
        None, description="sha256 of the template; filled in when absent, checked when given"
    )
    parameters: DecodingParameters = DecodingParameters()
    tokenizer_version: str
    embedding_version: str
    fine_tune_seed: int | None = None
    eval_uri: str | None = None
    license: str
    allowed_uses: tuple[str, ...] = ("commercial",)
    data_residency: tuple[str, ...] = ()
    price: Price

    @field_validator("model_id")
    @classmethod
    def _model_id_is_well_formed(cls, value: str) -> str:
        ModelId.parse(value)
        return value

    @field_validator("prompt_template")
    @classmethod
    def _template_takes_input(cls, value: str) -> str:
        if "{input}" not in value:
            raise ValueError("prompt_template must contain the placeholder '{input}'")
        return value

    @model_validator(mode="after")
    def _template_hash_matches(self) -> ModelManifest:
        actual = sha256_hex(self.prompt_template)
        if self.prompt_template_hash is None:
            object.__setattr__(self, "prompt_template_hash", actual)
        elif self.prompt_template_hash != actual:
            raise ValueError(
                "prompt_template_hash does not match prompt_template: "
                "remove the hash to have it computed, or restore the template"
            )
        return self

    @model_validator(mode="after")
    def _artifact_digest_names_an_artifact(self) -> ModelManifest:
        if (self.adapter_sha256 is None) != (self.adapter_bytes is None):
            raise ValueError("adapter_sha256 and adapter_bytes go together: give both or neither")
        if self.adapter_sha256 is not None and self.adapter_uri is None:
            raise ValueError("adapter_sha256 is given without adapter_uri: name the artifact")
        return self

    @property
    def id(self) -> ModelId:
        return ModelId.parse(self.model_id)

    @property
    def service(self) -> str:
        return self.id.app

    def canonical(self) -> str:
        """Fields added after manifests were first signed are left out while unset, so a
        manifest signed before they existed keeps its digest (and its signature)."""
        data = self.model_dump(mode="json")
        for name in ADDED_LATER:
            if data.get(name) is None:
                data.pop(name, None)
        return canonical_json(data)

    def digest(self) -> str:
        """sha256 of the canonical JSON: what is signed and what publishing is idempotent on."""
        return sha256_hex(self.canonical())

    def render(self, user_input: str) -> str:
        return self.prompt_template.replace("{input}", user_input)


class Signature(Frozen):
    algorithm: Literal["ed25519"] = "ed25519"
    key_id: str = Field(description="sha256 of the raw public key, first 16 hex digits")
    value: str = Field(description="base64 signature over the manifest digest")


class SignedManifest(Frozen):
    manifest: ModelManifest
    signature: Signature


Status = Literal["published", "shadow", "canary", "promoted", "rolled_back", "rejected"]
STATUSES: tuple[str, ...] = get_args(Status)


class PublishedVersion(Frozen):
    service: str
    version: str
    signed: SignedManifest
    digest: str
    status: Status
    tags: dict[str, str]
    aliases: tuple[str, ...] = ()
    created: bool = False
    run_id: str


class CompatibilityReport(Frozen):
    compatible: bool
    problems: tuple[str, ...] = ()

    def describe(self) -> str:
        """What preflight says: an incompatibility let through by `allow_incompatible` is named."""
        if not self.problems:
            return "compatible"
        return f"compatibility overridden (allow_incompatible): {'; '.join(self.problems)}"
