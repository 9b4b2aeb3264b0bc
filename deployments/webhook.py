"""CI webhook receiver: a signed delivery becomes one run of the `release` deployment.

Open-source Prefect has no webhooks, so this small app verifies the HMAC, validates the release
spec (a bad spec is answered 422 with the field and the reason, before anything starts) and calls
Prefect's REST API `create_flow_run` with the delivery id as idempotency key: a retried delivery
returns the run it already started.

    python -m deployments.webhook --port 8088 --prefect-api http://127.0.0.1:4200/api
    (secret from CANARYFLOW_WEBHOOK_SECRET, or from the file given with --secret-file;
    `canaryflow up` starts it this way on a free port, see canaryflow/stack.py)
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from canaryflow import retries
from canaryflow.deliveries import SeenDeliveries, verify_signature
from canaryflow.errors import ConfigError, WebhookSignatureError
from canaryflow.loading import spec_from_data

POLICIES = Path(__file__).resolve().parent / "policies"


@dataclass
class WebhookConfig:
    secret: str
    prefect_api_url: str
    deployment: str = "release/release"
    policies_dir: Path = POLICIES
    seen: SeenDeliveries = field(default_factory=SeenDeliveries)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


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
    response.raise_for_status()
    return str(response.json()["id"])


def build_app(config: WebhookConfig) -> Starlette:
    async def release(request: Request) -> JSONResponse:
        body = await request.body()
        try:
            verify_signature(
                config.secret,
                timestamp=request.headers.get("x-canaryflow-timestamp"),
                signature=request.headers.get("x-canaryflow-signature"),
                body=body,
            )
        except WebhookSignatureError as exc:
            return _error(401, str(exc))
        delivery = request.headers.get("x-canaryflow-delivery")
        if not delivery:
            return _error(400, "missing X-Canaryflow-Delivery: give every delivery a unique id")
        if (known := config.seen.get(delivery)) is not None:
            return JSONResponse({"flow_run_id": known, "replayed": True}, status_code=200)
        try:
            payload = json.loads(body)
            raw = payload.get("spec") if isinstance(payload, dict) else None
            spec = spec_from_data(raw, "the delivery's spec", None, config.policies_dir)
        except json.JSONDecodeError as exc:
            return _error(400, f"body is not JSON: {exc}")
        except ConfigError as exc:
            return _error(422, str(exc))
        async with httpx.AsyncClient(base_url=config.prefect_api_url, timeout=10) as client:
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
    args = parser.parse_args(argv)
    try:
        secret = read_secret(args.secret_file)
    except ConfigError as exc:
        parser.error(str(exc))
    config = WebhookConfig(
        secret=secret, prefect_api_url=args.prefect_api, deployment=args.deployment
    )
    uvicorn.run(build_app(config), host=args.host, port=args.port, access_log=False)


if __name__ == "__main__":
    main()
