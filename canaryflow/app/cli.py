"""`canaryflow` on the command line.

Imports stay inside the commands: `canaryflow --help` must not pay for Prefect or MLflow. This
is the application layer: only here (and in `flows/`, `tasks/`) are Prefect and `flows/` loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from canaryflow.errors import CanaryflowError

if TYPE_CHECKING:
    from canaryflow.contracts import Endpoints

Handler = Callable[[argparse.Namespace], int]


def _home(args: argparse.Namespace) -> Path:
    from canaryflow.settings import Settings

    return Path(args.home) if args.home else Settings().home


@contextlib.contextmanager
def _flows_of(endpoints: Endpoints) -> Iterator[None]:
    """Flows run in this process against the stack's Prefect, with the stack's endpoints
    pinned (never passed as a parameter); per-task lines go to logs/flows.log."""
    from canaryflow.app.prefect_session import prefect_session
    from canaryflow.app.summaries import console
    from canaryflow.settings import pinned_endpoints

    log_file = Path(endpoints.home) / "logs" / "flows.log"
    with (
        pinned_endpoints(endpoints),
        prefect_session(
            endpoints.prefect_api_url, log_file, lambda line: console.print(f"  {line}")
        ),
    ):
        yield


def cmd_demo(args: argparse.Namespace) -> int:
    from canaryflow.app.demo import run_demo

    return run_demo(_home(args) / "demo", quick=args.quick)


def cmd_up(args: argparse.Namespace) -> int:
    from canaryflow.app.demo import keep_stack_up
    from canaryflow.errors import ConfigError

    tools: dict[str, str] = {}
    for name, url in args.tool:
        if name in tools:
            raise ConfigError(f"--tool {name} given twice")
        tools[name] = url
    if tools and args.service is None:
        raise ConfigError("--tool needs --service: tools are called by the service's data plane")
    if args.max_body_bytes is not None and args.max_body_bytes < 1:
        raise ConfigError(f"--max-body-bytes must be at least 1, got {args.max_body_bytes}")
    if args.users is not None and args.service is None:
        raise ConfigError("--users needs --service: they send requests to the service's Envoy")
    if args.users is not None and not 0 < args.users <= 5000:
        raise ConfigError(f"--users is requests per second in (0, 5000], got {args.users}")
    return keep_stack_up(
        _home(args),
        service=args.service,
        tool_urls=tools,
        max_request_bytes=args.max_body_bytes,
        users_rps=args.users,
        providers_file=_providers_file(args),
        checkers_policy=Path(args.policy) if args.policy else None,
    )


def _providers_file(args: argparse.Namespace) -> Path | None:
    """`--providers FILE`, else the settings' (CANARYFLOW_PROVIDERS_FILE)."""
    from canaryflow.settings import Settings

    return Path(args.providers) if args.providers else Settings().providers_file


TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _tool(value: str) -> tuple[str, str]:
    """`NAME=URL` of `up --tool`: an OpenAI function name and an http(s) URL."""
    name, sep, url = value.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{value!r}: expected NAME=URL")
    if not TOOL_NAME.fullmatch(name):
        raise argparse.ArgumentTypeError(
            f"{value!r}: expected NAME=URL, NAME of letters, digits, _ or - (at most 64)"
        )
    if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", url):
        raise argparse.ArgumentTypeError(f"{value!r}: the URL must be http:// or https://")
    return name, url


def cmd_keys(args: argparse.Namespace) -> int:
    from canaryflow.registry.signing import generate_keypair

    pair = generate_keypair(Path(args.dir), args.name, args.service)
    print(f"private key {pair.private_path} (keep it in CI secrets)")
    print(f"public key  {pair.public_path} (key id {pair.key_id})")
    print(f"binding     {pair.services_path}: may sign for {', '.join(args.service)}")
    print("copy the public key and its binding to the trusted keys folder of the workers")
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    from canaryflow.loading import load_manifest
    from canaryflow.registry.artifacts import record_artifact
    from canaryflow.registry.signing import sign, write_signed

    # The artifact's sha256 and size go into the manifest first, so the signature covers them.
    signed = sign(record_artifact(load_manifest(Path(args.manifest))), Path(args.key))
    out = Path(args.output or Path(args.manifest).with_suffix(".signed.json"))
    write_signed(signed, out)
    print(f"signed {signed.manifest.model_id} (digest {signed.manifest.digest()[:16]}…) -> {out}")
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from canaryflow import connections
    from canaryflow.loading import load_signed_manifest
    from canaryflow.registry.signing import load_trusted_keys, verify
    from canaryflow.settings import load_endpoints

    endpoints = load_endpoints(_home(args))
    signed = load_signed_manifest(Path(args.manifest))
    verify(signed, load_trusted_keys(Path(endpoints.keys_dir)))
    registry = connections.registry(endpoints.mlflow_uri)
    published = registry.publish(signed)
    if args.champion:
        registry.promote(published.service, published.version)
    state = "new" if published.created else "already published"
    role = " as champion" if args.champion else ""
    print(f"{published.service} v{published.version} ({state}){role}")
    return 0


def cmd_verify_artifact(args: argparse.Namespace) -> int:
    from canaryflow import runbook
    from canaryflow.settings import load_endpoints

    endpoints = load_endpoints(_home(args))
    found = runbook.verify_artifact(endpoints, args.service, args.version)
    where = f"{args.service} v{args.version}"
    if found is None:
        print(f"{where} names no artifact (no adapter_uri): nothing to check")
    else:
        print(f"{where}: {found.uri} matches its signed digest (sha256 {found.sha256}, "
              f"{found.size} bytes)")  # fmt: skip
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    from canaryflow.loading import load_spec
    from canaryflow.settings import Settings, load_endpoints

    endpoints = load_endpoints(_home(args))
    spec = load_spec(Path(args.spec), Settings().policies_dir)
    from canaryflow.app.summaries import print_record
    from flows.release import release

    with _flows_of(endpoints):
        record = release(spec=spec)
    print_record(record)
    return 0 if record.decision == "promoted" else 3


def cmd_approve(args: argparse.Namespace) -> int:
    import uuid

    from canaryflow.app.approvals import paused_runs, resume_with_approval
    from canaryflow.errors import ConfigError
    from canaryflow.settings import load_endpoints

    if args.list:
        api = load_endpoints(_home(args)).prefect_api_url
        runs = paused_runs(api) if api else []
        for run in runs:
            print(f"{run['id']}  {run['name']}  paused since {run['state']['timestamp']}")
        if not runs:
            print("no release is waiting for approval")
        return 0
    if args.run_id is None or args.reason is None:
        raise ConfigError("approve needs RUN_ID and --reason (or --list to see the waiting runs)")
    try:
        uuid.UUID(args.run_id)
    except ValueError as exc:
        raise ConfigError(
            f"{args.run_id!r} is not a flow run id: copy the run's UUID from the Prefect UI"
        ) from exc
    endpoints = load_endpoints(_home(args))
    if endpoints.prefect_api_url is None:
        raise CanaryflowError("the stack has no Prefect API URL")
    try:
        status = resume_with_approval(
            endpoints.prefect_api_url,
            args.run_id,
            approve=not args.reject,
            reason=args.reason,
            approver=args.approver,
        )
    except CanaryflowError as exc:
        waiting = [f"{r['id']} ({r['name']})" for r in paused_runs(endpoints.prefect_api_url)]
        hint = "releases waiting for approval: " + (", ".join(waiting) or "none")
        raise CanaryflowError(f"{exc}\n{hint}") from exc
    verb = "rejected" if args.reject else "approved"
    print(f"flow run {args.run_id}: {verb} by {args.approver} ({status})")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    """On-call's rollback. A release still in flight is cancelled first and traffic goes back
    to that release's stable (its baseline), not to last-stable two versions back."""
    from canaryflow.settings import load_endpoints

    endpoints = load_endpoints(_home(args))
    from flows.rollback import rollback

    with _flows_of(endpoints):
        from canaryflow.app.summaries import print_progress
        from tasks.lock import cancel_releases_in_flight

        cancelled = cancel_releases_in_flight(args.service, args.reason)
        for line in cancelled:
            print_progress(f"cancelled release {line}")
        alias = "champion" if cancelled else "last-stable"
        rollback(service=args.service, to_version=args.to, reason=args.reason, to_alias=alias)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from canaryflow.app.summaries import print_status
    from canaryflow.deliveries import WEBHOOK_PATH, WEBHOOK_SECRET_ENV, WEBHOOK_SECRET_FILE
    from canaryflow.settings import load_endpoints

    home = _home(args)
    endpoints = load_endpoints(home)
    print_status(endpoints, args.service)
    webhook_url = endpoints.webhook_url
    if webhook_url is None:
        print("CI webhook receiver: not running")
    else:
        secret = (
            WEBHOOK_SECRET_ENV if os.environ.get(WEBHOOK_SECRET_ENV) else home / WEBHOOK_SECRET_FILE
        )
        print(f"CI webhook receiver: {webhook_url} (POST {WEBHOOK_PATH}, HMAC secret: {secret})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from canaryflow import runbook
    from canaryflow.app.summaries import print_eval
    from canaryflow.contracts import GatePolicy
    from canaryflow.loading import load_policy, load_signed_manifest
    from canaryflow.settings import Settings, load_endpoints

    endpoints = load_endpoints(_home(args))
    settings = Settings(providers_file=_providers_file(args))
    report = runbook.evaluate_manifests(
        load_signed_manifest(Path(args.candidate)).manifest,
        load_signed_manifest(Path(args.baseline)).manifest,
        args.suites,
        (load_policy(Path(args.policy)) if args.policy else GatePolicy()).offline,
        endpoints,
        sample_per_suite=args.sample,
        providers=settings.providers(endpoints),
    )
    print_eval(report)
    return 0 if report.decision.value == "pass" else 3


def cmd_traffic(args: argparse.Namespace) -> int:
    import asyncio

    from canaryflow.local.loadgen import load_corpus, run_traffic

    report = asyncio.run(
        run_traffic(
            args.url,
            load_corpus(args.corpus),
            rate_rps=args.rate,
            duration_s=args.duration,
            users=args.users,
        )
    )
    print(report.model_dump_json(indent=2))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from canaryflow.dataplane.serve import main as serve

    serve(args.rest)
    return 0


def cmd_sandbox(args: argparse.Namespace) -> int:
    from canaryflow.sandbox.server import main as sandbox

    sandbox(args.rest, prog="canaryflow sandbox")
    return 0


def cmd_judge(args: argparse.Namespace) -> int:
    from canaryflow.app.judge_cli import main as judge

    return judge(args.rest, providers=args.providers, home=args.home)


# Commands whose options belong to a module's own parser (`python -m canaryflow.dataplane.serve`,
# `python -m canaryflow.sandbox`): everything after the command's name, `--help` included, is
# handed to that parser unread, so the two entry points accept exactly the same options and
# `canaryflow --help` still imports neither module.
PASS_THROUGH = ("serve", "sandbox", "judge")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="canaryflow", description=__doc__.splitlines()[0])
    parser.add_argument("--home", help="state folder of the embedded stack (.canaryflow)")
    parser.add_argument(
        "--providers",
        metavar="FILE",
        help="providers file (keys by reference) for `eval` and `up` "
        "(default: $CANARYFLOW_PROVIDERS_FILE)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.set_defaults(handler=handler)
        return command

    demo = add("demo", cmd_demo, "start the embedded stack and run the demo releases")
    demo.add_argument("--quick", action="store_true", help="shorter windows")
    up = add("up", cmd_up, "start the embedded stack and keep it running for the UIs")
    up.add_argument("--service", default=None, help="also start the data plane for it")
    up.add_argument(
        "--tool",
        type=_tool,
        action="append",
        default=[],
        metavar="NAME=URL",
        help="where the model services POST the arguments of a call to tool NAME (repeat for "
        "more; the shadow service never calls them)",
    )
    up.add_argument(
        "--max-body-bytes",
        type=int,
        default=None,
        metavar="N",
        help="request bodies above N bytes are refused 413 by Envoy and the model services "
        "(default: 1 MiB)",
    )
    up.add_argument(
        "--users",
        type=float,
        default=None,
        metavar="RPS",
        help="simulated users: send the example corpus to the service's public Envoy listener at "
        "RPS requests/s once its data plane runs (what the gates judge; off by default)",
    )
    up.add_argument("--home", default=argparse.SUPPRESS, help="same as canaryflow --home")
    up.add_argument(
        "--providers",
        default=argparse.SUPPRESS,
        metavar="FILE",
        help="your providers file, merged with the sandbox's entry into <home>/providers.yaml "
        "for the model services (default: $CANARYFLOW_PROVIDERS_FILE)",
    )
    up.add_argument(
        "--policy",
        default=None,
        metavar="FILE",
        help="a policy whose `checkers:` the model services run (default: the built-in ones, "
        "as deployments/policies/default.yaml)",
    )
    keys = add("keys", cmd_keys, "make an ed25519 key pair for signing manifests")
    keys.add_argument("--dir", default=".canaryflow/keys")
    keys.add_argument("--name", default="ci")
    keys.add_argument(
        "--service",
        action="append",
        required=True,
        metavar="NAME",
        help="a service the key may sign for (repeat for more); '*' for every service",
    )
    sign = add("sign", cmd_sign, "sign a model manifest")
    sign.add_argument("manifest")
    sign.add_argument("--key", required=True)
    sign.add_argument("-o", "--output")
    publish = add("publish", cmd_publish, "publish a signed manifest to the registry")
    publish.add_argument("manifest")
    publish.add_argument("--champion", action="store_true", help="and make it the champion")
    check = add("verify-artifact", cmd_verify_artifact,
                "check a published version's artifact against its signed digest")  # fmt: skip
    check.add_argument("service")
    check.add_argument("version", help="a version number, or an alias such as champion")
    release = add("release", cmd_release, "run the release flow for a spec")
    release.add_argument("spec")
    approve = add("approve", cmd_approve, "answer a paused release (as the Prefect UI does)")
    approve.add_argument("run_id", nargs="?")
    approve.add_argument("--reason")
    approve.add_argument("--list", action="store_true", help="the releases waiting for an answer")
    approve.add_argument("--approver", default=os.environ.get("USER", "cli"))
    approve.add_argument("--reject", action="store_true")
    rollback = add("rollback", cmd_rollback, "roll a service back to last-stable or a version")
    rollback.add_argument("service")
    rollback.add_argument(
        "--to", default=None, help="version (default: last-stable, or a running release's stable)"
    )
    rollback.add_argument("--reason", default="manual rollback")
    status = add("status", cmd_status, "aliases, versions and live routes of a service")
    status.add_argument("service")
    evaluate = add("eval", cmd_eval, "offline evaluation of a candidate against a baseline")
    evaluate.add_argument("candidate")
    evaluate.add_argument("baseline")
    evaluate.add_argument("--suites", nargs="+", default=["golden", "regression", "safety"])
    evaluate.add_argument("--sample", type=int, default=None)
    evaluate.add_argument(
        "--policy", help="policy file whose offline margins apply (default: seed's)"
    )
    traffic = add("traffic", cmd_traffic, "replay a prompt corpus at a set rate")
    traffic.add_argument("url")
    traffic.add_argument("--corpus", default="live")
    traffic.add_argument("--rate", type=float, default=50.0)
    traffic.add_argument("--duration", type=float, default=10.0)
    traffic.add_argument("--users", type=int, default=50)
    for name, handler, text in (
        ("serve", cmd_serve, "run one model service (its options: serve --help)"),
        ("sandbox", cmd_sandbox, "run the sandbox LLM provider (its options: sandbox --help)"),
        ("judge", cmd_judge, "judge agreement on a labelled set (its options: judge check --help)"),
    ):
        command = sub.add_parser(name, help=text, description=text, add_help=False)
        command.set_defaults(handler=handler)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command not in PASS_THROUGH and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    # `canaryflow serve -- --port ...` (the old spelling) still works.
    args.rest = rest[1:] if rest[:1] == ["--"] else rest
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from canaryflow.settings import missing_mlflow_client_env

    # An entry point: MLflow's client fails within seconds and prints no run links.
    os.environ.update(missing_mlflow_client_env(os.environ))
    try:
        code: int = args.handler(args)
    except CanaryflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
