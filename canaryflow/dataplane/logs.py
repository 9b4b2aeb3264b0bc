"""Structured logs, opt in: one JSON object per line that Loki / promtail take without parsing.

Beside the data plane because its masking is the data plane's (`pii.mask_pii`); the model
services are its first users, the release flows and the judge service the others.

`CANARYFLOW_LOG_FORMAT=json` turns them on for the process (the model services, the CLI, the
worker's flows); unset or `text`, logging is left as it was. Each line has `ts`, `level`,
`logger`, `message`, and `service`, `release_id`, `version`, `role` where the process knows
them (`bind`, `log_context`). Nothing else of the record is copied: no `extra` fields (a caller
could pass a request through them), no exception message or traceback text (an error about a
bad request can quote it), only the exception's type and where it was raised. The message goes
through the same masking as stored request text, so a secret that reaches a log line is masked.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import traceback
from collections.abc import Iterator, Mapping
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from typing import TextIO

from canaryflow.dataplane.pii import mask_pii

LOG_FORMAT_ENV = "CANARYFLOW_LOG_FORMAT"
FIELDS = ("service", "release_id", "version", "role")
# The loggers a JSON process formats: canaryflow's own, and the server and clients under it.
LOGGERS = ("", "uvicorn", "uvicorn.error", "uvicorn.access")

# Fixed for the process (a model service serves one service), then per context (a release).
_PROCESS: dict[str, str] = {}
_CONTEXT: ContextVar[Mapping[str, str] | None] = ContextVar("canaryflow_log_context", default=None)


def _clean(fields: Mapping[str, object | None]) -> dict[str, str]:
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise ValueError(f"log context fields are {', '.join(FIELDS)}; got {sorted(unknown)}")
    return {key: str(value) for key, value in fields.items() if value is not None}


def bind(**fields: object | None) -> Token[Mapping[str, str] | None]:
    """Add fields to this context's log lines (None leaves a field as it was)."""
    return _CONTEXT.set({**(_CONTEXT.get() or {}), **_clean(fields)})


@contextlib.contextmanager
def log_context(**fields: object | None) -> Iterator[None]:
    """`bind` for the body only."""
    token = bind(**fields)
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def current_fields() -> dict[str, str]:
    return {**_PROCESS, **(_CONTEXT.get() or {})}


class JsonFormatter(logging.Formatter):
    """One JSON object per line; keys in a fixed order, UTC timestamps with milliseconds."""

    def format(self, record: logging.LogRecord) -> str:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not lose the line
            message = str(record.msg)
        line: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name or "root",
            "message": mask_pii(message),
        }
        line.update(current_fields())
        if record.exc_info and record.exc_info[0] is not None:
            kind, _, trace = record.exc_info
            line["error"] = kind.__name__
            frames = traceback.extract_tb(trace)[-3:] if trace is not None else []
            line["where"] = [f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in frames]
        return json.dumps(line, ensure_ascii=False, separators=(",", ":"))


def json_enabled(environ: Mapping[str, str] | None = None) -> bool:
    value = (os.environ if environ is None else environ).get(LOG_FORMAT_ENV, "text")
    value = value.strip().lower()
    if value not in ("json", "text", ""):
        raise ValueError(f"{LOG_FORMAT_ENV} must be 'json' or 'text', got {value!r}")
    return value == "json"


def configure_logging(
    service: str | None = None,
    *,
    role: str | None = None,
    environ: Mapping[str, str] | None = None,
    stream: TextIO | None = None,
    level: int = logging.INFO,
) -> bool:
    """With `CANARYFLOW_LOG_FORMAT=json`: every line of the process as JSON on stderr, labelled
    with `service` (and `role`) for the process's life. Returns whether JSON is on; otherwise
    changes nothing. Called after a server configured its own loggers, so it replaces theirs."""
    if not json_enabled(environ):
        return False
    _PROCESS.update(_clean({"service": service, "role": role}))
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name in LOGGERS:
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            logger.removeHandler(old)
        if name:
            logger.propagate = True  # to the root's one JSON handler
    # The root keeps its level: libraries' INFO lines (an HTTP client logs every URL) stay out.
    logging.getLogger().addHandler(handler)
    logging.getLogger("canaryflow").setLevel(level)
    return True
