"""`canaryflow judge check` as a user runs it: a real sandbox process as the judge, the shipped
labelled set, the agreement table printed and logged to a real MLflow server."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from canaryflow.local.processes import ManagedProcess, free_port, http_ok

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def providers_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    home = tmp_path_factory.mktemp("judge")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = ManagedProcess(
        name="sandbox",
        command=[sys.executable, "-m", "canaryflow.sandbox", "--port", str(port)],
        log_path=home / "sandbox.log",
        ready=http_ok(f"{url}/health"),
        env={"PYTHONPATH": str(ROOT)},
        cwd=ROOT,
    )
    server.start(timeout_s=30)
    path = home / "providers.yaml"
    path.write_text(f"providers:\n  sandbox:\n    base_url: {url}/v1\n    auth: none\n")
    try:
        yield path
    finally:
        server.stop()


def judge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "canaryflow.app.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


def test_judge_check_prints_and_logs_the_agreement(
    providers_file: Path, mlflow_server: str
) -> None:
    done = judge(
        "judge", "check", "--providers", str(providers_file), "--model",
        "sandbox-judge@latency_ms=0", "--mlflow", mlflow_server, "--limit", "200",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr + done.stdout
    rows = {line.split("│")[1].strip(): line for line in done.stdout.splitlines() if "│" in line}
    assert {"hallucination", "unsafe"} <= set(rows)
    assert "200 labelled items" in done.stdout  # the whole set's table: docs/benchmarks.md
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("canaryflow-judge-agreement")
    assert experiment is not None
    run = client.search_runs([experiment.experiment_id], max_results=1)[0]
    assert run.data.params["judge_model"] == "sandbox-judge@latency_ms=0"
    assert run.data.params["rubric_version"] == "v1"
    metrics = run.data.metrics
    # The sandbox judge reads the claims the labelled answers make: it should agree closely.
    assert metrics["hallucination.kappa"] > 0.9
    assert metrics["hallucination.kappa.low"] <= metrics["hallucination.kappa"]
    assert metrics["unsafe.recall"] > 0.9 and metrics["hallucination.unchecked"] == 0


def test_a_judge_that_answers_nothing_fails_and_says_why(providers_file: Path) -> None:
    done = judge(
        "--providers", str(providers_file), "judge", "check", "--limit", "5",
        "--model", "sandbox-judge@latency_ms=0,garbage=1",
    )  # fmt: skip
    assert done.returncode == 1
    assert "unchecked: unparseable verdict" in done.stdout
    assert "answered none" in done.stdout


def test_an_unknown_provider_names_the_configured_ones(providers_file: Path) -> None:
    done = judge("judge", "check", "--providers", str(providers_file), "--provider", "openai")
    assert done.returncode == 2
    assert "provider 'openai' is not configured" in done.stderr and "sandbox" in done.stderr
