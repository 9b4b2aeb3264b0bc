"""What every contract shares: strict pydantic bases and canonical hashing."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

MODEL_ID_PATTERN = re.compile(
    r"^(?P<app>[a-z0-9][a-z0-9-]*)/(?P<model>[a-z0-9][a-z0-9._-]*?)"
    r"-v(?P<version>\d+\.\d+(?:\.\d+)?)\+(?P<dataset>[a-z0-9][a-z0-9-]*)$"
)
Percent = Annotated[float, Field(ge=0.0, le=100.0)]
Seconds = Annotated[float, Field(ge=0.0)]


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def canonical_json(data: Any) -> str:
    """Sorted keys, no spaces, UTF-8: the same object always hashes the same."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
