"""JSON log lines: the fixed fields, the context labels, and what never gets in."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from canaryflow.dataplane import logs


@pytest.fixture(autouse=True)
def _clean_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), logging.getLogger("canaryflow").level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    logging.getLogger("canaryflow").setLevel(level)
    logs._PROCESS.clear()


def _format(record: logging.LogRecord) -> dict[str, object]:
    line = logs.JsonFormatter().format(record)
    assert "\n" not in line
    parsed: dict[str, object] = json.loads(line)
    return parsed


def _record(msg: str, *args: object, **kw: object) -> logging.LogRecord:
    return logging.LogRecord("canaryflow.serve", logging.WARNING, "x.py", 1, msg, args, None, **kw)  # type: ignore[arg-type]


def test_a_line_has_the_fixed_fields_in_utc() -> None:
    record = _record("writing %d request records failed", 3)
    record.created = 1_764_720_000.25
    assert _format(record) == {
        "ts": "2025-12-03T00:00:00.250+00:00",
        "level": "warning",
        "logger": "canaryflow.serve",
        "message": "writing 3 request records failed",
    }


def test_context_labels_ride_along_and_are_undone_on_exit() -> None:
    with logs.log_context(release_id="r-1", service="my-assistant"):
        with logs.log_context(version="7", role="canary"):
            line = _format(_record("window judged"))
        assert "version" not in _format(_record("after"))
    assert line["release_id"] == "r-1" and line["service"] == "my-assistant"
    assert line["version"] == "7" and line["role"] == "canary"
    assert "release_id" not in _format(_record("outside"))


def test_unknown_context_fields_are_refused() -> None:
    with pytest.raises(ValueError, match="prompt"):
        logs.bind(prompt="hello")


def test_extras_exception_text_and_secrets_stay_out() -> None:
    record = _record("provider answered for key %s", "sk-abcdefghijklmnopqrstuvwxyz0123456789")
    record.prompt = "the user's question"
    try:
        raise ValueError("the user's question was: how do I reset my password")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    line = _format(record)
    text = json.dumps(line)
    assert "user's question" not in text and "sk-abcdef" not in text
    assert line["error"] == "ValueError"
    assert isinstance(line["where"], list) and "test_json_logs.py" in line["where"][-1]  # type: ignore[index]


def test_off_unless_asked() -> None:
    assert not logs.configure_logging("svc", environ={})
    assert not logs.configure_logging("svc", environ={"CANARYFLOW_LOG_FORMAT": "text"})
    with pytest.raises(ValueError, match="CANARYFLOW_LOG_FORMAT"):
        logs.json_enabled({"CANARYFLOW_LOG_FORMAT": "yaml"})


def test_configured_process_writes_json_lines_labelled_with_its_service() -> None:
    stream = io.StringIO()
    assert logs.configure_logging("my-assistant", environ={"CANARYFLOW_LOG_FORMAT": "JSON"},
                                  stream=stream)  # fmt: skip
    logging.getLogger("canaryflow.dataplane").info("routes confirmed")
    logging.getLogger("uvicorn.error").warning("shutting down")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(x["logger"], x["message"], x["service"]) for x in lines] == [
        ("canaryflow.dataplane", "routes confirmed", "my-assistant"),
        ("uvicorn.error", "shutting down", "my-assistant"),
    ]


def test_the_promtail_example_reads_the_lines_with_the_json_stage_only() -> None:
    from pathlib import Path

    import yaml

    config = yaml.safe_load(
        (
            Path(__file__).resolve().parents[2] / "deployments/observability/promtail.yaml"
        ).read_text()
    )
    [job] = config["scrape_configs"]
    stages = [next(iter(stage)) for stage in job["pipeline_stages"]]
    assert stages == ["json", "labels", "timestamp"]  # parsing is `json`; the rest names fields
    expressions = job["pipeline_stages"][0]["json"]["expressions"]
    assert set(expressions.values()) <= {"ts", "level", "logger", *logs.FIELDS}
    assert "release_id" not in job["pipeline_stages"][1]["labels"]  # one stream per release: no
    line = json.loads(logs.JsonFormatter().format(_record("x")))
    assert {"ts", "level", "logger"} <= set(line)
