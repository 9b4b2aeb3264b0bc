"""`canaryflow judge check --labels FILE`: how far the live judge agrees with human labels.

Runs the `llm_judge` checker (a providers-file entry and a model) over a labelled set, prints
precision, recall and Cohen's kappa per flag with their intervals, and with `--mlflow URI` logs
them as an MLflow run (parameters: provider, model, rubric version, labels file and its digest).

`canaryflow judge serve --store URL --policy FILE --port N`: the live gates' verdicts over HTTP
for Argo Rollouts and Flagger (`canaryflow.app.judge_service`).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
from collections.abc import Sequence
from pathlib import Path

from canaryflow.contracts import LlmJudgeChecker, ProvidersFile, Rubric
from canaryflow.dataplane.logs import configure_logging
from canaryflow.errors import ConfigError

DEFAULT_LABELS = Path(__file__).resolve().parents[1] / "data" / "judge_labels.jsonl"
EXPERIMENT = "canaryflow-judge-agreement"


def build_parser(prog: str = "canaryflow judge") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    check = sub.add_parser("check", help="run the judge on a labelled set, print the agreement")
    check.add_argument(
        "--labels", default=str(DEFAULT_LABELS), help="JSON lines (default: the shipped set)"
    )
    check.add_argument("--provider", default="sandbox", help="providers-file entry of the judge")
    check.add_argument("--model", default="sandbox-judge")
    check.add_argument("--rubric-version", default="v1")
    check.add_argument("--providers", metavar="FILE", help="providers file (keys by reference)")
    check.add_argument("--mlflow", metavar="URI", help="log the table to this MLflow server")
    check.add_argument("--concurrency", type=int, default=16)
    check.add_argument("--timeout", type=float, default=30.0, help="seconds per judge call")
    check.add_argument(
        "--limit", type=int, default=None, help="N items spread evenly over the set (every label)"
    )
    serve = sub.add_parser(
        "serve", help="answer verdicts over HTTP for Argo Rollouts' web provider and Flagger"
    )
    serve.add_argument(
        "--store", required=True, metavar="URL", help="the request store: a SQLite file, "
        "sqlite:///PATH or postgresql://USER@HOST/DB (a password: PGPASSWORD, not the URL)",
    )  # fmt: skip
    serve.add_argument("--policy", metavar="FILE", help="gate policy (default: the seed's gates)")
    serve.add_argument("--host", default="127.0.0.1", help="listen address (default: loopback)")
    serve.add_argument("--port", type=int, default=8490)
    serve.add_argument(
        "--memory-ttl", type=float, default=6 * 3600, metavar="SECONDS",
        help="forget a rollout's sequential evidence this long after its last verdict",
    )  # fmt: skip
    serve.add_argument(
        "--max-rollouts", type=int, default=1000, metavar="N",
        help="keep the sequential evidence of at most N rollouts (the least recent go first)",
    )  # fmt: skip
    serve.add_argument(
        "--max-records", type=int, default=50_000, metavar="N",
        help="read at most N records per version for one verdict (a busier window is shortened)",
    )  # fmt: skip
    return parser


def run_serve(args: argparse.Namespace) -> int:
    import logging

    from canaryflow.app.judge_service import serve
    from canaryflow.contracts import GatePolicy
    from canaryflow.loading import load_policy

    if not 0 < args.port < 65536:
        raise ConfigError(f"--port must lie in 1..65535, got {args.port}")
    for flag, value in (("--max-rollouts", args.max_rollouts), ("--max-records", args.max_records)):
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    if args.memory_ttl <= 0:
        raise ConfigError(f"--memory-ttl must be positive, got {args.memory_ttl}")
    policy = load_policy(Path(args.policy)) if args.policy else GatePolicy()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    configure_logging()  # CANARYFLOW_LOG_FORMAT=json: JSON lines instead
    serve(
        args.store, policy, host=args.host, port=args.port, ttl_s=args.memory_ttl,
        max_keys=args.max_rollouts, max_records=args.max_records,
    )  # fmt: skip
    return 0


def _providers(args: argparse.Namespace, home: str | None) -> ProvidersFile:
    """--providers, else $CANARYFLOW_PROVIDERS_FILE, else the running stack's own entries."""
    from canaryflow.providers.config import from_urls, load_providers
    from canaryflow.settings import Settings, load_endpoints

    if args.providers:
        return load_providers(Path(args.providers))
    settings = Settings(home=Path(home)) if home else Settings()
    if settings.providers_file is not None:
        return load_providers(settings.providers_file)
    try:
        return from_urls(load_endpoints(settings.home).provider_urls)
    except ConfigError:
        raise ConfigError(
            "no providers to call the judge through: pass --providers FILE (with an entry "
            f"named {args.provider!r}), or start the stack (canaryflow up)"
        ) from None


def run_check(args: argparse.Namespace, home: str | None) -> int:
    from canaryflow.app.summaries import console
    from canaryflow.quality.agreement import agreement_table, judge_all, load_labels
    from canaryflow.quality.llm_judge import LlmJudge

    if args.concurrency < 1:
        raise ConfigError(f"--concurrency must be at least 1, got {args.concurrency}")
    labels = Path(args.labels)
    items = load_labels(labels)
    if args.limit is not None and 0 < args.limit < len(items):
        step = len(items) / args.limit  # evenly spread: the set is ordered by label
        items = [items[int(i * step)] for i in range(args.limit)]
    config = LlmJudgeChecker(
        provider=args.provider,
        model=args.model,
        rubric_version=args.rubric_version,
        rubrics=(Rubric.GROUNDEDNESS, Rubric.SAFETY),
        timeout_s=args.timeout,
    )
    judge = LlmJudge(config, _providers(args, home), source="the providers file")
    verdicts = asyncio.run(judge_all(judge, items, args.concurrency))
    table = agreement_table(items, verdicts)
    console.print(_render(table, f"{args.provider}/{args.model} rubric {args.rubric_version}"))
    console.print(f"{len(items)} labelled items from {labels}")
    reasons = sorted({v.reason for row in verdicts for v in row.values() if v.raised is None})
    unanswered = [r for r in reasons if r.startswith(("judge", "unparseable"))]
    for reason in unanswered[:3]:
        console.print(f"unchecked: {reason}", markup=False)
    if all(row.n == 0 for row in table):
        console.print("the judge answered none of the items")
        return 1
    if args.mlflow:
        run_id = _log_to_mlflow(args, labels, len(items), table)
        console.print(f"logged to MLflow run {run_id} (experiment {EXPERIMENT})")
    return 0


def _render(table: Sequence[object], title: str) -> object:
    from rich.table import Table

    out = Table(title=f"judge agreement: {title}")
    for column in ("flag", "n", "unchecked", "TP", "FP", "FN", "TN"):
        out.add_column(column, justify="right" if column != "flag" else "left")
    for column in ("precision [95%]", "recall [95%]", "kappa [95%]"):
        out.add_column(column, justify="right")
    for row in table:
        r = row.as_dict()  # type: ignore[attr-defined]
        cells = [r["flag"], *(str(r[k]) for k in ("n", "unchecked", "tp", "fp", "fn", "tn"))]
        for key in ("precision", "recall", "kappa"):
            e = r[key]
            cells.append(f"{e['value']:.3f} [{e['low']:.3f}, {e['high']:.3f}]")
        out.add_row(*cells)
    return out


def _log_to_mlflow(args: argparse.Namespace, labels: Path, n: int, table: Sequence[object]) -> str:
    import mlflow

    mlflow.set_tracking_uri(args.mlflow)
    mlflow.set_experiment(EXPERIMENT)
    digest = hashlib.sha256(labels.read_bytes()).hexdigest()
    with mlflow.start_run(run_name=f"{args.provider}/{args.model} {args.rubric_version}") as run:
        mlflow.log_params(
            {
                "provider": args.provider,
                "judge_model": args.model,
                "rubric_version": args.rubric_version,
                "labels": labels.name,
                "labels_sha256": digest,
                "items": n,
            }
        )
        rows = [row.as_dict() for row in table]  # type: ignore[attr-defined]
        metrics: dict[str, float] = {}
        for r in rows:
            metrics[f"{r['flag']}.unchecked"] = r["unchecked"]
            for key in ("precision", "recall", "kappa"):
                for part in ("value", "low", "high"):
                    value = r[key][part]
                    if value == value:  # NaN is not logged
                        metrics[f"{r['flag']}.{key}" + ("" if part == "value" else f".{part}")] = (
                            value
                        )
        mlflow.log_metrics(metrics)
        mlflow.log_dict({"rows": rows}, "judge_agreement.json")
        return str(run.info.run_id)


def main(
    argv: Sequence[str] | None = None, providers: str | None = None, home: str | None = None
) -> int:
    """`providers` / `home`: canaryflow's own --providers / --home, when given before `judge`."""
    args = build_parser().parse_args(argv)
    if args.action == "serve":
        return run_serve(args)
    if args.providers is None:
        args.providers = providers
    return run_check(args, home)
