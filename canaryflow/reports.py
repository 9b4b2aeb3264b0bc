"""Human-readable evidence: the tables and markdown a reviewer reads in Prefect and MLflow."""

from __future__ import annotations

from canaryflow.contracts import EvalReport, Evidence, GateResult, WindowResult


def _num(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}g}"


def _interval(evidence: Evidence) -> str:
    if evidence.ci_low is None or evidence.ci_high is None:
        return "—"
    return f"[{_num(evidence.ci_low)}, {_num(evidence.ci_high)}]"


def gate_rows(gates: tuple[GateResult, ...] | list[GateResult]) -> list[dict[str, str]]:
    """One row per gate, every number a human needs to see why it decided what it did."""
    return [
        {
            "gate": g.gate,
            "severity": g.severity.value,
            "result": g.label.value.upper(),
            "baseline": _num(g.evidence.baseline),
            "candidate": _num(g.evidence.candidate),
            "estimate": _num(g.evidence.estimate),
            "95% CI": _interval(g.evidence),
            "p": _num(g.evidence.p_value, 2),
            "threshold": _num(g.evidence.threshold),
            "n (base/cand)": f"{g.evidence.n_baseline}/{g.evidence.n_candidate}",
            "reason": g.reason,
        }
        for g in gates
    ]


def markdown_table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "_no rows_"
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = (str(row[h]).replace("|", "\\|").replace("\n", " ") for h in header)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def eval_markdown(report: EvalReport) -> str:
    suites = [
        {
            "suite": s.suite,
            "n": str(s.n),
            "baseline": f"{s.baseline_rate:.1%}",
            "candidate": f"{s.candidate_rate:.1%}",
            "diff (pts)": f"{s.diff * 100:+.1f}",
            "95% CI (pts)": f"[{s.diff_ci[0] * 100:+.1f}, {s.diff_ci[1] * 100:+.1f}]",
            "McNemar b/c": f"{s.only_baseline}/{s.only_candidate}",
            "p": f"{s.mcnemar_p:.2g}",
            "margin (pts)": f"{s.margin * 100:.1f}",
            "result": s.result.label.value.upper(),
        }
        for s in report.suites
    ]
    return "\n\n".join(
        [
            f"# Offline evaluation: {report.decision.value.upper()}",
            f"Candidate `{report.candidate}` against baseline `{report.baseline}`: "
            f"{sum(s.n for s in report.suites)} paired items, {report.tokens} tokens, "
            f"${report.cost_usd:.4f}, {report.seconds:.1f} s ({report.cached} answers from cache).",
            markdown_table(suites),
            "\n".join(f"- {s.result.reason}" for s in report.suites),
        ]
    )


def window_markdown(window: WindowResult) -> str:
    title = (
        f"# {window.stage} step {window.step + 1} ({window.weight:g}%), "
        f"window {window.window + 1}: {window.decision.value.upper()}"
    )
    counts = ", ".join(f"{role}: {n}" for role, n in sorted(window.requests.items()))
    return "\n\n".join(
        [
            title,
            f"{window.started_at:%H:%M:%S}–{window.ended_at:%H:%M:%S} UTC; requests {counts}.",
            markdown_table(gate_rows(window.gates)),
        ]
    )
