"""Answering a paused release survives the Prefect API's retryable answers (503 under load)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from canaryflow.approvals import resume_with_approval
from canaryflow.errors import CanaryflowError


class FlakyPrefect(BaseHTTPRequestHandler):
    """Answers 503 `busy` times (as Prefect does for a locked database), then ACCEPT."""

    busy: ClassVar[int] = 0
    calls: ClassVar[list[dict[str, object]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        FlakyPrefect.calls.append(body)
        if len(FlakyPrefect.calls) <= FlakyPrefect.busy:
            self._answer(503, {"exception_message": "Service Unavailable"})
        else:
            self._answer(200, {"status": "ACCEPT"})

    def _answer(self, status: int, body: dict[str, object]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def api() -> Iterator[str]:
    FlakyPrefect.calls = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FlakyPrefect)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/api"
    server.shutdown()
    server.server_close()


def test_resume_retries_prefects_retryable_503(api: str) -> None:
    FlakyPrefect.busy = 2
    status = resume_with_approval(api, "run-1", approve=True, reason="ok", approver="alice")
    assert status == "ACCEPT"
    assert len(FlakyPrefect.calls) == 3
    assert FlakyPrefect.calls[-1] == {
        "run_input": {"approve": True, "reason": "ok", "approver": "alice"}
    }


def test_resume_gives_up_after_the_retries_with_a_clear_error(api: str) -> None:
    FlakyPrefect.busy = 100
    with pytest.raises(CanaryflowError, match=r"answered 503 .* still paused: try again"):
        resume_with_approval(api, "run-1", approve=True, reason="ok", approver="alice")
    assert len(FlakyPrefect.calls) == 5
