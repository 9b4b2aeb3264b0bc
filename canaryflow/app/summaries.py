"""Terminal output: the tables a person reads at the end of a release or a demo."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table

from canaryflow.contracts import Endpoints, EvalReport, ReleaseRecord

# Logs of CI jobs are not terminals: give them a readable width instead of rich's 80 columns.
console = Console(width=None if sys.stdout.isatty() else 140)

COLOURS = {
    "passed": "green", "done": "green", "approved": "green", "promoted": "bold green",
    "failed": "red", "rejected": "red", "rolled_back": "bold red",
    "review": "yellow", "skipped": "dim",
}  # fmt: skip


def headline(reason: str, limit: int = 110) -> str:
    """The first finding of a reason, for one-line summaries (the full text is in the ledger)."""
    first = reason.split("; ")[0]
    return first if len(first) <= limit else first[: limit - 1] + "…"


def print_progress(line: str) -> None:
    """A progress line from a running flow, verbatim: `[canary_5pct]` is not rich markup."""
    console.print(f"  {line}", markup=False, highlight=False)


def _paint(text: str) -> str:
    colour = COLOURS.get(text)
    return f"[{colour}]{text}[/]" if colour else text


def record_table(record: ReleaseRecord) -> Table:
    table = Table(title=f"{record.candidate}: {record.decision.upper()}", title_justify="left")
    table.add_column("stage")
    table.add_column("outcome")
    table.add_column("key figures / evidence", overflow="fold")
    for stage in record.stages:
        figures = ", ".join(f"{k}={v:.3g}" for k, v in stage.metrics.items())
        detail = f"{stage.detail} [dim]{figures}[/]" if figures else stage.detail
        table.add_row(stage.key, _paint(stage.outcome), detail)
    return table


def print_record(record: ReleaseRecord) -> None:
    console.print(record_table(record))
    if record.breach_to_stable_ms is not None:
        console.print(
            f"breach to all traffic on stable: [bold]{record.breach_to_stable_ms:.0f} ms[/]"
        )


def print_eval(report: EvalReport) -> None:
    table = Table(title=f"offline evaluation: {report.decision.value.upper()}")
    for column in ("suite", "n", "baseline", "candidate", "diff (95% CI)", "McNemar p", "result"):
        table.add_column(column)
    for s in report.suites:
        table.add_row(
            s.suite,
            str(s.n),
            f"{s.baseline_rate:.1%}",
            f"{s.candidate_rate:.1%}",
            f"{s.diff * 100:+.1f} [{s.diff_ci[0] * 100:+.1f}, {s.diff_ci[1] * 100:+.1f}] pts",
            f"{s.mcnemar_p:.2g}",
            _paint({"pass": "passed", "fail": "failed"}.get(s.result.label.value, "review")),
        )
    console.print(table)


def print_status(endpoints: Endpoints, service: str) -> None:
    from canaryflow import connections

    registry = connections.registry(endpoints.mlflow_uri)
    aliases = registry.aliases(service)
    table = Table(title=f"{service}: aliases")
    table.add_column("alias")
    table.add_column("version")
    table.add_column("model id")
    table.add_column("status")
    for alias, version in sorted(aliases.items()):
        published = registry.get(service, version)
        table.add_row(alias, version, published.signed.manifest.model_id, published.status)
    console.print(table)
    if endpoints.envoy_admin_url is not None:
        routes = connections.traffic_controller(endpoints, service).current()
        console.print(f"live routes: {routes.model_dump() if routes else 'none'}")
