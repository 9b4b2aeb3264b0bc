"""CI webhook receiver: a signed delivery becomes one run of the `release` deployment.

Open-source Prefect has no webhooks, so this small app verifies the HMAC, validates the release
spec (a bad spec is answered 422 with the field and the reason, before anything starts) and calls
Prefect's REST API `create_flow_run` with the delivery id as idempotency key: a retried delivery
returns the run it already started.

Hostile input fails safe, in this order, and no 4xx answer echoes a submitted value:
- 413 for a body over `max_body_bytes` (1 MiB): a larger Content-Length is refused before a byte
  of the body is read, a chunked body is read up to the limit and no further; the connection is
  closed.
- 400 for a missing or malformed X-Canaryflow-Delivery.
- 401 unless the HMAC over `timestamp.delivery.body` matches and the timestamp is finite unix
  seconds within the tolerance; checked before the body is parsed.
- A replay (same signature) of a delivery accepted in the last 2x tolerance, remembered on disk
  across restarts (`--state-dir`), is answered 200 with the run it started (`replayed: true`):
  idempotent, never a second run. So is a known delivery id (in memory, then Prefect's
  idempotency key).
- 400 for a body that is not JSON; 422 for a bad spec, naming each field and the rule.
- 503 (redeliver later, it is safe) when Prefect stays busy through the retries, or refuses
  the receiver's credentials (the answer says which variable to set).

Prefect's API credentials are read from the environment, as Prefect's own clients read them:
`PREFECT_API_AUTH_STRING` (`user:password`, a self-hosted server started with
`PREFECT_SERVER_API_AUTH_STRING`) is sent as HTTP basic auth, `PREFECT_API_KEY` (Prefect Cloud) as
a bearer token. Never on the command line, where `ps` shows them.

    python -m deployments.webhook --port 8088 --prefect-api http://127.0.0.1:4200/api \
        --state-dir .canaryflow/webhook
    (secret from CANARYFLOW_WEBHOOK_SECRET, or from the file given with --secret-file;
    `canaryflow up` starts it this way on a free port, see canaryflow/local/stack.py)
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from canaryflow import retries
from canaryflow.deliveries import (
    DELIVERY_ID_RULE,
    ReplayMemory,
    SeenDeliveries,
    valid_delivery_id,
    verify_signature,
)
from canaryflow.errors import ConfigError, WebhookSignatureError
from canaryflow.loading import spec_from_data

POLICIES = Path(__file__).resolve().parent / "policies"
MAX_BODY_BYTES = 1024 * 1024
DEFAULT_STATE_DIR = Path(".canaryflow") / "webhook"


@dataclass
class WebhookConfig:
    secret: str
    prefect_api_url: str
    deployment: str = "release/release"
    policies_dir: Path = POLICIES
    seen: SeenDeliveries = field(default_factory=SeenDeliveries)
    # In memory unless given one on disk: `main` always does (`--state-dir`).
    replays: ReplayMemory = field(default_factory=ReplayMemory)
    max_body_bytes: int = MAX_BODY_BYTES
    prefect_auth: httpx.Auth | None = field(default=None, repr=False)


def prefect_auth_from(environ: Mapping[str, str]) -> httpx.Auth | None:
    """The credentials Prefect's own client would send, from the same variables."""
    auth_string = environ.get("PREFECT_API_AUTH_STRING", "")
    if auth_string:
        user, sep, password = auth_string.partition(":")
        if not sep:
            raise ConfigError("PREFECT_API_AUTH_STRING must be 'user:password'")
        return httpx.BasicAuth(user, password)
    api_key = environ.get("PREFECT_API_KEY", "")
    return _Bearer(api_key) if api_key else None


class _Bearer(httpx.Auth):
    def __init__(self, token: str) -> None:
        self._header = f"Bearer {token}"

    def auth_flow(self, request: httpx.Request) -> Iterator[httpx.Request]:
        request.headers["Authorization"] = self._header
        yield request


def _error(status: int, message: str, *, close: bool = False) -> JSONResponse:
    headers = {"connection": "close"} if close else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class BodyTooLarge(Exception):
    pass


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (`BodyTooLarge`) as soon as it is known to pass `limit` bytes: from
    Content-Length before anything is read, else once the chunks read so far pass it."""
    announced = request.headers.get("content-length")
    if announced is not None and not (
        announced.isascii() and announced.isdigit() and int(announced) <= limit
    ):
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(body: bytes) -> object:
    """JSON, or ValueError with a message that quotes nothing of the body."""
    try:
        return json.loads(body)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        raise ValueError(f"body is not JSON: {exc.msg} ({where})") from None
    except (ValueError, RecursionError) as exc:
        raise ValueError("body is not JSON: not UTF-8 text, or nested too deeply") from exc


class PrefectUnavailable(Exception):
    """Prefect kept failing after the retries: CI may redeliver (the delivery id makes it safe)."""


async def _call(
    client: httpx.AsyncClient, method: str, url: str, body: object = None
) -> httpx.Response:
    """Prefect answers 503 for errors a client may retry (a busy database): retry those."""
    try:
        response = await retries.acall(lambda: client.request(method, url, json=body))
    except httpx.TransportError as exc:
        problem = f"is unreachable ({exc})"
    else:
        if not retries.is_retryable_status(response.status_code):
            return response
        problem = f"answered {response.status_code}: {response.text[:200]}"
    raise PrefectUnavailable(f"the Prefect API {problem}; redeliver later, it is safe")


async def _deployment_id(client: httpx.AsyncClient, config: WebhookConfig) -> str:
    flow_name, deployment_name = config.deployment.split("/", 1)
    response = await _call(client, "GET", f"/deployments/name/{flow_name}/{deployment_name}")
    if response.status_code == 404:
        raise LookupError(
            f"deployment {config.deployment!r} not found: run `prefect deploy --all` first"
        )
    if response.status_code in (401, 403):
        given = "were refused" if config.prefect_auth else "are missing"
        raise LookupError(
            f"the Prefect API answered {response.status_code}: the receiver's credentials "
            f"{given}; set PREFECT_API_AUTH_STRING (or PREFECT_API_KEY) in its environment"
        )
    response.raise_for_status()
    return str(response.json()["id"])


def build_app(config: WebhookConfig) -> Starlette:
    async def release(request: Request) -> JSONResponse:
        limit = config.max_body_bytes
        try:
            body = await _read_body(request, limit)
        except BodyTooLarge:
            return _error(413, f"body over the limit of {limit} bytes: refused", close=True)
        delivery = request.headers.get("x-canaryflow-delivery")
        if delivery is None or not valid_delivery_id(delivery):
            return _error(400, f"{DELIVERY_ID_RULE}: give every delivery a unique id")
        signature = request.headers.get("x-canaryflow-signature") or ""
        try:
            timestamp = verify_signature(
                config.secret,
                timestamp=request.headers.get("x-canaryflow-timestamp"),
                delivery=delivery,
                signature=signature,
                body=body,
            )
        except WebhookSignatureError as exc:
            return _error(401, str(exc))
        if (known := config.replays.answered(signature)) is not None:
            return JSONResponse({"flow_run_id": known, "replayed": True}, status_code=200)
        if (known := config.seen.get(delivery)) is not None:
            return JSONResponse({"flow_run_id": known, "replayed": True}, status_code=200)
        try:
            payload = _parse(body)
            raw = payload.get("spec") if isinstance(payload, dict) else None
            spec = spec_from_data(
                raw, "the delivery's spec", None, config.policies_dir, untrusted=True
            )
        except ConfigError as exc:
            return _error(422, str(exc))
        except ValueError as exc:
            return _error(400, str(exc))
        async with httpx.AsyncClient(
            base_url=config.prefect_api_url, timeout=10, auth=config.prefect_auth
        ) as client:
            try:
                deployment_id = await _deployment_id(client, config)
                response = await _call(
                    client,
                    "POST",
                    f"/deployments/{deployment_id}/create_flow_run",
                    {
                        "parameters": {"spec": spec.model_dump(mode="json")},
                        "idempotency_key": f"ci-delivery-{delivery}",
                        "tags": ["canaryflow", f"service:{spec.service}"],
                    },
                )
            except (LookupError, PrefectUnavailable) as exc:
                return _error(503, str(exc))
            response.raise_for_status()
        run_id = str(response.json()["id"])
        config.seen.remember(delivery, run_id)
        config.replays.remember(
            signature=signature, timestamp=timestamp, delivery=delivery, run_id=run_id
        )
        return JSONResponse({"flow_run_id": run_id, "replayed": False}, status_code=202)

    async def health(_: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    return Starlette(
        routes=[Route("/hooks/release", release, methods=["POST"]), Route("/health", health)]
    )


def read_secret(secret_file: Path | None) -> str:
    """The file wins over CANARYFLOW_WEBHOOK_SECRET; no secret at all is a start-up error."""
    if secret_file is not None:
        try:
            secret = secret_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the webhook secret file {secret_file}: {exc}") from exc
    else:
        secret = os.environ.get("CANARYFLOW_WEBHOOK_SECRET", "").strip()
    if not secret:
        raise ConfigError(
            "the webhook has no secret: set CANARYFLOW_WEBHOOK_SECRET or pass --secret-file "
            "(the same secret CI signs its deliveries with)"
        )
    return secret


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8088)
    parser.add_argument("--prefect-api", required=True)
    parser.add_argument("--deployment", default="release/release")
    parser.add_argument("--secret-file", type=Path, default=None)
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help="folder for the replay memory (an owner-only SQLite file); keep it across restarts",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=MAX_BODY_BYTES,
        help="larger deliveries are refused with 413 before their body is read",
    )
    args = parser.parse_args(argv)
    if args.max_body_bytes < 1:
        parser.error("--max-body-bytes must be at least 1")
    try:
        secret = read_secret(args.secret_file)
        replays = ReplayMemory.in_folder(args.state_dir)
        prefect_auth = prefect_auth_from(os.environ)
    except ConfigError as exc:
        parser.error(str(exc))
    config = WebhookConfig(
        secret=secret,
        prefect_api_url=args.prefect_api,
        deployment=args.deployment,
        replays=replays,
        max_body_bytes=args.max_body_bytes,
        prefect_auth=prefect_auth,
    )
    uvicorn.run(build_app(config), host=args.host, port=args.port, access_log=False)


if __name__ == "__main__":
    main()
