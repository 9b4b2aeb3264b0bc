"""Preflight: refuse a bad candidate before anything else happens."""

from __future__ import annotations

from prefect.artifacts import create_markdown_artifact

from canaryflow import runbook
from canaryflow.contracts import Endpoints, PolicyFloor, ReleaseSpec
from canaryflow.settings import Settings
from tasks.common import artifact_key, silence_within_s, step


@step()
def verify_candidate(
    spec: ReleaseSpec, floor: PolicyFloor, endpoints: Endpoints
) -> runbook.Preflight:
    """Policy floor, windows against the silence automation (prefect.yaml's `within`),
    signature, the candidate's provider (the worker's providers file), baseline, compatibility
    (tokenizer, embeddings, license...)."""
    providers = Settings().providers(endpoints)
    result = runbook.preflight(spec, endpoints, floor, silence_within_s(), providers)
    manifest = spec.candidate.manifest
    problems = "\n".join(f"- {p}" for p in result.compatibility.problems) or "- none"
    provider = result.provider.evidence if result.provider else ("not checked",)
    create_markdown_artifact(
        key=artifact_key("preflight", spec.service),
        markdown=(
            f"# Preflight: {manifest.model_id}\n\n"
            f"- digest `{manifest.digest()[:16]}…`, signed by key `{result.key_id}`: verified\n"
            f"- baseline `{spec.baseline_alias}` = v{result.baseline.version} "
            f"({result.baseline.signed.manifest.model_id})\n"
            f"- compatibility problems:\n{problems}\n"
            "- provider:\n" + "".join(f"  - {line}\n" for line in provider)
        ),
        description="signature and compatibility checks",
    )
    return result
