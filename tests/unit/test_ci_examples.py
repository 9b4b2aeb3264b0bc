"""The CI examples in deployments/ci/ (GitHub Actions, GitLab CI, Tekton): each parses, runs only
`canaryflow` commands the CLI has, and its delivery script, run for real against a local
receiver, sends a body signed exactly as `canaryflow.deliveries` signs and verifies it."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from canaryflow.app.cli import build_parser, parse_args
from canaryflow.deliveries import sign_payload, verify_signature

CI = Path(__file__).resolve().parents[2] / "deployments" / "ci"
EXAMPLES = ("github-actions.yml", "gitlab-ci.yml", "tekton.yaml")


def scripts(name: str) -> list[str]:
    """The shell each example runs, one string per step (job script lines joined)."""
    docs = [d for d in yaml.safe_load_all((CI / name).read_text()) if d]
    if name == "github-actions.yml":
        return [s["run"] for job in docs[0]["jobs"].values() for s in job["steps"] if "run" in s]
    if name == "gitlab-ci.yml":
        jobs = [v for v in docs[0].values() if isinstance(v, dict) and "script" in v]
        return [line for job in jobs for line in [*job.get("before_script", []), *job["script"]]]
    return [step["script"] for d in docs if d["kind"] == "Task" for step in d["spec"]["steps"]]


def commands(script: str) -> Iterator[list[str]]:
    for line in script.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        for i, word in enumerate(words):  # `a && b`: each part its own command
            if os.path.basename(word) == "canaryflow" and (i == 0 or words[i - 1] == "&&"):
                end = words.index("&&", i) if "&&" in words[i:] else len(words)
                yield words[i + 1 : end]


@pytest.mark.parametrize("name", EXAMPLES)
def test_the_cli_commands_exist(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    found = [args for script in scripts(name) for args in commands(script)]
    assert [args[0] for args in found] == ["sign"], found
    for args in found:
        parsed = parse_args(args)  # every option the example passes is one the CLI takes
        assert parsed.command == args[0]
        with pytest.raises(SystemExit) as done:
            build_parser().parse_args([args[0], "--help"])
        assert done.value.code == 0
        assert "--key" in capsys.readouterr().out


def test_the_tekton_pipeline_runs_the_task_with_its_workspaces() -> None:
    task, pipeline = yaml.safe_load_all((CI / "tekton.yaml").read_text())
    assert (task["apiVersion"], task["kind"], pipeline["kind"]) == (
        "tekton.dev/v1",
        "Task",
        "Pipeline",
    )
    run = next(
        t
        for t in pipeline["spec"]["tasks"]
        if t.get("taskRef", {}).get("name") == task["metadata"]["name"]
    )
    given = {w["name"] for w in run["workspaces"]}
    assert given == {w["name"] for w in task["spec"]["workspaces"]}
    assert given <= {w["name"] for w in pipeline["spec"]["workspaces"]}


class _Receiver(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[str, dict[str, str], bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        self.received.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
        self.send_response(202)
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"flow_run_id": "run-1"}')

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[tuple[str, dict[str, str], bytes]]]]:
    server = HTTPServer(("127.0.0.1", 0), _Receiver)
    _Receiver.received = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", _Receiver.received
    server.shutdown()
    server.server_close()


@pytest.mark.skipif(not (shutil.which("bash") and shutil.which("curl") and shutil.which("openssl")),
                    reason="the examples' scripts need bash, curl and openssl")  # fmt: skip
@pytest.mark.parametrize("name", EXAMPLES)
def test_the_delivery_is_signed_as_the_receiver_verifies(
    name: str, tmp_path: Path, receiver: tuple[str, list[tuple[str, dict[str, str], bytes]]]
) -> None:
    url, received = receiver
    (tmp_path / "models" / "my-assistant").mkdir(parents=True)
    (tmp_path / "models" / "my-assistant" / "release.yaml").write_text("service: my-assistant\n")
    manifest = {"manifest": {"service": "my-assistant"}, "signature": "x", "key_id": "ci"}
    (tmp_path / "manifest.signed.json").write_text(json.dumps(manifest))
    [delivery] = [s for s in scripts(name) if "/hooks/release" in s]
    secret, delivery_id = "s3cret-for-the-test", "ci-42_a"
    env = {**os.environ, "SECRET": secret, "URL": url, "DELIVERY": delivery_id,
           "SPEC": "models/my-assistant/release.yaml",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", delivery], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    [(path, headers, body)] = received
    assert path == "/hooks/release" and headers["content-type"] == "application/json"
    assert json.loads(body) == {"spec": {"service": "my-assistant", "candidate": manifest}}
    timestamp = headers["x-canaryflow-timestamp"]
    assert headers["x-canaryflow-delivery"] == delivery_id
    assert headers["x-canaryflow-signature"] == sign_payload(secret, timestamp, delivery_id, body)
    verify_signature(secret, timestamp=timestamp, delivery=delivery_id,
                     signature=headers["x-canaryflow-signature"], body=body)  # fmt: skip
