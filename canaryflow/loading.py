"""Read manifests, specs and policies from YAML or JSON, with errors a person can act on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from canaryflow.contracts import (
    GatePolicy,
    ModelManifest,
    PolicyFloor,
    ReleaseSpec,
    SignedManifest,
)
from canaryflow.errors import ConfigError, ManifestError, PolicyError, SpecError

M = TypeVar("M", bound=BaseModel)


def describe(error: ValidationError) -> str:
    """One line per problem: `field.path: reason (got value)`."""
    lines = []
    for problem in error.errors():
        where = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        got = problem.get("input")
        shown = "" if isinstance(got, dict | list) else f" (got {got!r})"
        lines.append(f"  - {where}: {problem['msg']}{shown}")
    return "\n".join(lines)


def read_document(path: Path) -> Any:
    """JSON files get the stricter JSON parser (and its error positions); the rest YAML."""
    if not path.exists():
        raise ConfigError(f"{path}: no such file")
    text = path.read_text()
    try:
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: not valid {path.suffix.lstrip('.') or 'YAML'}: {exc}") from exc


def validate(model: type[M], data: Any, source: str, error: type[ConfigError]) -> M:
    if not isinstance(data, dict):
        raise error(f"{source}: expected a mapping of fields, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise error(
            f"{source} is not a valid {model.__name__} ({exc.error_count()} problem(s)):\n"
            f"{describe(exc)}\nFix the fields above and try again."
        ) from exc


def load_manifest(path: Path) -> ModelManifest:
    return validate(ModelManifest, read_document(path), str(path), ManifestError)


def load_signed_manifest(path: Path) -> SignedManifest:
    data = read_document(path)
    if isinstance(data, dict) and "signature" not in data:
        raise ManifestError(
            f"{path} has no signature: sign it first with `canaryflow sign {path} --key KEY`"
        )
    return validate(SignedManifest, data, str(path), ManifestError)


def load_policy(path: Path) -> GatePolicy:
    return validate(GatePolicy, read_document(path), str(path), PolicyError)


def load_floors(path: Path) -> dict[str, PolicyFloor]:
    """`{default: FLOOR, services: {NAME: FLOOR}}`: each floor as `PolicyFloor`'s fields."""
    data = read_document(path)
    if not isinstance(data, dict) or not set(data) <= {"default", "services"}:
        raise PolicyError(f"{path}: expected a mapping with 'default' and/or 'services'")
    floors = {"default": validate(PolicyFloor, data.get("default") or {}, str(path), PolicyError)}
    for name, floor in (data.get("services") or {}).items():
        floors[str(name)] = validate(PolicyFloor, floor or {}, f"{path} ({name})", PolicyError)
    return floors


def load_spec(path: Path, policies_dir: Path | None = None) -> ReleaseSpec:
    """A spec may name its candidate and policy by file: paths are relative to the spec."""
    return spec_from_data(read_document(path), str(path), path.parent, policies_dir)


def spec_from_data(
    data: Any, source: str, base_dir: Path | None, policies_dir: Path | None
) -> ReleaseSpec:
    """Validate a spec; `candidate: FILE` needs a base_dir, `policy: NAME` a policies folder."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: expected a mapping of fields, got {type(data).__name__}")
    data = dict(data)
    if isinstance(data.get("candidate"), str):
        if base_dir is None:
            raise SpecError(f"{source}: give the signed manifest inline, not as a file name")
        data["candidate"] = load_signed_manifest(base_dir / data["candidate"]).model_dump()
    if isinstance(data.get("policy"), str):
        policy_path = _find_policy(data["policy"], base_dir, policies_dir)
        data["policy"] = load_policy(policy_path).model_dump()
    return validate(ReleaseSpec, data, source, SpecError)


def _find_policy(name: str, spec_dir: Path | None, policies_dir: Path | None) -> Path:
    candidates = [spec_dir / name] if spec_dir is not None else []
    if policies_dir is not None:
        candidates += [policies_dir / name, policies_dir / f"{name}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise PolicyError(f"policy {name!r} not found (looked at {tried})")
