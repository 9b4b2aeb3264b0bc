"""canaryflow's live judge over HTTP, for Argo Rollouts' `web` metric provider and Flagger's
webhooks: teams on those controllers get the verdict and its evidence without canaryflow's flows.

`GET /v1/verdict?service=S&stable=V1&canary=V2&window=60s` (or `POST /v1/verdict` with the same
fields as JSON, or Flagger's webhook payload) judges the last `window` of the request store's
records of the two versions with the policy's live gates and answers the verdict as JSON, status
200 for every judged answer (Argo reads `result.decision`). `strict=1`, and
`POST /v1/flagger/verdict`, answer 412 unless the decision is pass: Flagger reads only the status
code (any status above 202 is a failed check; 412, not a 5xx, so its HTTP client does not retry).

Flagger's payload `{name, namespace, phase, checksum, metadata: {...}}` maps as: `metadata` holds
the fields (`stable`, `canary`, and optionally `service`, `window`, `role`); `service` defaults to
`name`; `checksum` is the `run` (a new Flagger revision starts its evidence afresh); `namespace`
and `phase` are not used.

The judging, its bounds and its per-key sequential state are `canaryflow.app.verdicts`'s. A
restart resets the state, which is conservative: evidence starts over. Prefect is never imported
here: the service needs the store and a policy file, nothing of canaryflow's stack.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from canaryflow.app.verdicts import USAGE, BadQuery, MemoryBook, VerdictJudge, parse_query
from canaryflow.contracts import Decision, GatePolicy
from canaryflow.dataplane.store import Store

log = logging.getLogger("canaryflow.judge_service")

MAX_BODY_BYTES = 16 * 1024
FLAGGER_FIELDS = frozenset({"name", "namespace", "phase", "checksum", "metadata"})


def fields_of_body(body: Any) -> dict[str, Any]:
    """A flat JSON object, or Flagger's webhook payload mapped as the module docstring says."""
    if not isinstance(body, dict):
        raise BadQuery(f"the body must be a JSON object; {USAGE}")
    metadata = body.get("metadata")
    if not isinstance(metadata, dict):
        return body
    extra = sorted(k for k in body if k not in FLAGGER_FIELDS)
    if extra:
        raise BadQuery(f"a Flagger payload has only {', '.join(sorted(FLAGGER_FIELDS))}; {USAGE}")
    fields: dict[str, Any] = {}
    if isinstance(body.get("name"), str):
        fields["service"] = body["name"]
    if isinstance(body.get("checksum"), str) and body["checksum"]:
        fields["run"] = body["checksum"][:128]
    return {**fields, **metadata}


async def _read_json(request: Request) -> Any:
    """The body as JSON, read no further than `MAX_BODY_BYTES`."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise BadQuery(f"the body is over {MAX_BODY_BYTES} bytes; {USAGE}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise BadQuery(f"the body is over {MAX_BODY_BYTES} bytes; {USAGE}")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks) or b"null")
    except (ValueError, UnicodeDecodeError):
        raise BadQuery(f"the body is not JSON; {USAGE}") from None


def judge_app(judge: VerdictJudge, max_concurrent: int = 4) -> Starlette:
    """`max_concurrent` judgments at once (each reads the store and bootstraps); more wait."""
    slots = asyncio.Semaphore(max_concurrent)

    async def answer(request: Request, *, flagger: bool) -> Response:
        try:
            if request.method == "POST":
                fields = fields_of_body(await _read_json(request))
            else:
                fields = dict(request.query_params)
            query = parse_query(fields)
        except BadQuery as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        async with slots:
            verdict = await run_in_threadpool(judge.judge, query)
        strict = flagger or query.strict
        status = 200 if not strict or verdict["decision"] == Decision.PASS.value else 412
        return JSONResponse(verdict, status_code=status)

    async def verdict(request: Request) -> Response:
        return await answer(request, flagger=False)

    async def flagger_verdict(request: Request) -> Response:
        return await answer(request, flagger=True)

    async def health(request: Request) -> Response:
        return JSONResponse({"ready": True, "policy": judge.policy.name, "keys": len(judge.book)})

    return Starlette(
        routes=[
            Route("/health", health),
            Route("/v1/verdict", verdict, methods=["GET", "POST"]),
            Route("/v1/flagger/verdict", flagger_verdict, methods=["POST"]),
        ]
    )


def serve(
    store_url: str,
    policy: GatePolicy,
    *,
    host: str = "127.0.0.1",
    port: int = 8490,
    ttl_s: float = 6 * 3600,
    max_keys: int = 1000,
    max_records: int = 50_000,
) -> None:
    """Serve until interrupted. Read-only on the store; the URL is logged without a password."""
    import uvicorn

    from canaryflow.dataplane.backends import redact

    book = MemoryBook(ttl_s=ttl_s, max_keys=max_keys)
    with Store(store_url) as store:
        app = judge_app(VerdictJudge(store, policy, book=book, max_records=max_records))
        log.info("judging %s with policy %s on %s:%d", redact(store_url), policy.name, host, port)
        uvicorn.run(app, host=host, port=port, log_level="info", limit_concurrency=64)
