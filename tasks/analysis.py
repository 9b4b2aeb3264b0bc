"""Window analysis: let a window of live traffic pass, judge it, publish the evidence."""

from __future__ import annotations

from datetime import datetime

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from canaryflow import reports, runbook
from canaryflow.analysis.gates import GateMemory
from canaryflow.analysis.late import LateLook
from canaryflow.contracts import Endpoints, GatePolicy, Role, Routes, WindowResult
from tasks.common import artifact_key, step


@step(retries=0, task_run_name="judge-{stage}-step{step}-window{window}")
def judge_window(
    endpoints: Endpoints,
    policy: GatePolicy,
    stage: str,
    routes: Routes,
    step: int,
    window: int,
    window_s: float,
    memory: GateMemory,
) -> tuple[WindowResult, GateMemory]:
    """The judge's memory goes in and comes back out: the flow keeps it across windows."""
    result, memory = runbook.observe_window(
        endpoints,
        policy,
        stage=stage,
        routes=routes,
        step=step,
        window=window,
        window_s=window_s,
        memory=memory,
    )
    key = artifact_key(stage, routes.service, "gates")
    create_table_artifact(
        key=key,
        table=reports.gate_rows(result.gates),
        description=f"{stage} step {step + 1} window {window + 1}: {result.decision.value}",
    )
    create_markdown_artifact(
        key=artifact_key(stage, routes.service, "window"),
        markdown=reports.window_markdown(result),
        description=f"{stage} window evidence",
    )
    return result, memory


@step(retries=0, task_run_name="judge-late-records")
def judge_late_records(
    endpoints: Endpoints,
    policy: GatePolicy,
    routes: Routes,
    candidate_role: Role,
    last_end: datetime,
    late_s: float,
    memory: GateMemory | None,
) -> LateLook:
    """The last window's late finishers, judged before the release promotes."""
    look = runbook.observe_late_records(endpoints, policy, routes=routes,
                                        candidate_role=candidate_role, last_end=last_end,
                                        late_s=late_s, memory=memory)  # fmt: skip
    create_table_artifact(
        key=artifact_key("late", routes.service, "gates"),
        table=reports.gate_rows(look.gates),
        description=f"late records: {look.decision.value}: {look.describe()}",
    )
    return look
