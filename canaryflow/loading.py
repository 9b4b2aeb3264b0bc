"""Read manifests, specs and policies from YAML or JSON, with errors a person can act on."""

from __future__ import annotations

import json
import re
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


def describe(error: ValidationError, data: Any = None, *, untrusted: bool = False) -> str:
    """One line per problem: `field.path: reason [type] (got value)`.

    `untrusted` (a delivery from the network): never the submitted value. No `(got ...)`, keys
    that are not plain field names shown as `<key>`, an unknown field not named, and the
    submitted strings cut out of the validators' own messages.
    """
    lines = []
    for problem in error.errors():
        loc = list(problem["loc"])
        if not untrusted:
            where = ".".join(str(part) for part in loc) or "(top level)"
            got = problem.get("input")
            shown = "" if isinstance(got, dict | list) else f" (got {got!r})"
            lines.append(f"  - {where}: {problem['msg']} [{problem['type']}]{shown}")
            continue
        message = problem["msg"]
        if problem["type"] == "extra_forbidden":
            loc, message = loc[:-1], "unknown field (extra fields are not permitted)"
        elif problem["type"] in {"value_error", "assertion_error"}:
            message = _scrub(message, data)
        where = ".".join(_safe_part(part) for part in loc) or "(top level)"
        lines.append(f"  - {where}: {message} [{problem['type']}]")
    return "\n".join(lines)


_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_REDACTED = "<submitted value>"


def _safe_part(part: int | str) -> str:
    if isinstance(part, int) or _FIELD_NAME.fullmatch(part):
        return str(part)
    return "<key>"


def _strings(data: Any) -> set[str]:
    """Every string in submitted data: values, and keys that `_safe_part` would not show."""
    if isinstance(data, str):
        return {data}
    if isinstance(data, dict):
        keys = {str(k) for k in data if _safe_part(str(k)) == "<key>"}
        return keys | {s for v in data.values() for s in _strings(v)}
    if isinstance(data, list | tuple):
        return {s for v in data for s in _strings(v)}
    return set()


def _scrub(message: str, data: Any) -> str:
    """A validator's message without the submitted values it quotes: strings (quoted anywhere,
    unquoted from 4 characters) and the project's trailing `got ...` clause."""
    message = re.sub(r",?\s*\(?\bgot\b.*$", "", message)
    for text in sorted(_strings(data), key=len, reverse=True):
        if not text:
            continue
        for quoted in (repr(text), f'"{text}"', f"'{text}'"):
            message = message.replace(quoted, _REDACTED)
        if len(text) >= 4:
            message = message.replace(text, _REDACTED)
    return message


def read_document(path: Path) -> Any:
    """JSON files get the stricter JSON parser (and its error positions); the rest YAML."""
    if not path.exists():
        raise ConfigError(f"{path}: no such file")
    text = path.read_text()
    try:
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: not valid {path.suffix.lstrip('.') or 'YAML'}: {exc}") from exc


def validate(
    model: type[M], data: Any, source: str, error: type[ConfigError], *, untrusted: bool = False
) -> M:
    """`untrusted`: the data came over the network, and the message must not echo it."""
    if not isinstance(data, dict):
        raise error(f"{source}: expected a mapping of fields, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise error(
            f"{source} is not a valid {model.__name__} ({exc.error_count()} problem(s)):\n"
            f"{describe(exc, data, untrusted=untrusted)}\nFix the fields above and try again."
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
    data: Any,
    source: str,
    base_dir: Path | None,
    policies_dir: Path | None,
    *,
    untrusted: bool = False,
) -> ReleaseSpec:
    """Validate a spec; `candidate: FILE` needs a base_dir, `policy: NAME` a policies folder.

    `untrusted` (a CI delivery): errors never echo a submitted value (see `describe`)."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: expected a mapping of fields, got {type(data).__name__}")
    data = dict(data)
    if isinstance(data.get("candidate"), str):
        if base_dir is None:
            raise SpecError(f"{source}: give the signed manifest inline, not as a file name")
        data["candidate"] = load_signed_manifest(base_dir / data["candidate"]).model_dump()
    if isinstance(data.get("policy"), str):
        policy_path = find_policy(data["policy"], base_dir, policies_dir)
        data["policy"] = load_policy(policy_path).model_dump()
    return validate(ReleaseSpec, data, source, SpecError, untrusted=untrusted)


POLICY_NAME = re.compile(r"[a-z0-9_-]{1,64}")
POLICY_NAME_RULE = (
    "a policy name must match ^[a-z0-9_-]+$ (lower-case letters, digits, '_' and '-', at most 64: "
    "no path, no extension) and name a file NAME.yaml inside the policies folder"
)


def find_policy(name: str, spec_dir: Path | None, policies_dir: Path | None) -> Path:
    """The policy a spec names. A spec file may name a file next to it (its author's own); any
    other name, and every name in a delivery (no spec_dir), must follow `POLICY_NAME_RULE` and
    resolve inside `policies_dir`, symlinks followed. Errors name the rule, never the name."""
    if spec_dir is not None and (spec_dir / name).is_file():
        return spec_dir / name
    if POLICY_NAME.fullmatch(name) is None:
        raise PolicyError(f"the spec's policy is not a valid policy name: {POLICY_NAME_RULE}")
    if policies_dir is None:
        raise PolicyError("the spec names a policy, but no policies folder is configured")
    root = policies_dir.resolve()
    path = (root / f"{name}.yaml").resolve()
    if not path.is_relative_to(root):
        raise PolicyError(
            "the spec's policy resolves outside the policies folder (a symlink): "
            + POLICY_NAME_RULE
        )
    if not path.is_file():
        known = sorted(
            p.stem
            for p in root.glob("*.yaml")
            if POLICY_NAME.fullmatch(p.stem) and p.resolve().is_relative_to(root) and p.is_file()
        )
        raise PolicyError(
            "the spec's policy names no policy of the policies folder; known: "
            f"{', '.join(known) or 'none'}"
        )
    return path


SILENCE_TRIGGER = "canaryflow-silent-canary"


def load_silence_within(prefect_yaml: Path) -> float:
    """The silence automation's `within`, in seconds: the `canaryflow-silent-canary` trigger of
    the rollback deployment in `prefect.yaml`, the one place it is set (what `prefect deploy`
    creates). Windows and approval heartbeats are checked and paced against it."""
    config = read_document(prefect_yaml)
    for deployment in config.get("deployments") or []:
        for trigger in deployment.get("triggers") or []:
            if trigger.get("name") == SILENCE_TRIGGER:
                within = trigger.get("within")
                if not isinstance(within, int | float) or isinstance(within, bool) or within <= 0:
                    raise ConfigError(
                        f"{prefect_yaml}: trigger {SILENCE_TRIGGER!r} needs a positive `within` "
                        f"in seconds, got {within!r}"
                    )
                return float(within)
    raise ConfigError(f"{prefect_yaml} has no trigger named {SILENCE_TRIGGER!r}")
