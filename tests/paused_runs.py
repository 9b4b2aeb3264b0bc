"""A real flow run paused for its approval form, for the tests that answer it (the API's and
the browser's)."""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prefect.logging.handlers import APILogWorker
from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

from canaryflow.app.approvals import paused_runs, resume_with_approval
from tests.waiting import wait_for


@dataclass
class PausedRun:
    id: str
    thread: threading.Thread
    box: dict[str, object] = field(default_factory=dict)

    def answer(self, timeout_s: float = 60.0) -> object:
        """What the flow returned (or raised), once it has: the paused process polls every 1 s."""
        self.thread.join(timeout_s)
        return self.box.get("answer", self.box.get("error"))


@contextlib.contextmanager
def paused_flow_run(
    ask: Any, flow_name: str, run_name: str, api: str, *, timeout_s: float, ui: str | None = None
) -> Iterator[PausedRun]:
    """Run the flow `ask` in a thread until it pauses; reject it at the end if it still waits.

    `ui`: the UI's URL, which the evidence link in the form is built from."""
    box: dict[str, object] = {}
    start: Callable[[], object] = ask.with_options(flow_run_name=run_name)

    def run() -> None:
        try:
            box["answer"] = start()
        except BaseException as exc:
            box["error"] = exc

    updates: dict[Any, str] = {PREFECT_API_URL: api}
    if ui is not None:
        updates[PREFECT_UI_URL] = ui
    with temporary_settings(updates=updates):
        context = contextvars.copy_context()  # the thread must carry the Prefect settings
    thread = threading.Thread(target=context.run, args=(run,), daemon=True)
    thread.start()
    run_id = wait_for(
        f"flow run {run_name} to pause",
        lambda: next((r["id"] for r in paused_runs(api, flow_name) if r["name"] == run_name), None),
        timeout_s=timeout_s,
        interval_s=0.2,
    )
    paused = PausedRun(str(run_id), thread, box)
    try:
        yield paused
    finally:
        if any(r["id"] == paused.id for r in paused_runs(api, flow_name)):
            resume_with_approval(
                api, paused.id, approve=False, reason="test over", approver="pytest"
            )
        thread.join(30)
        APILogWorker.drain_all(timeout=5, at_exit=False)  # not at exit, when the server is gone
