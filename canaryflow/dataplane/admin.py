"""The model service's admin listener: warm-up, metrics, health. Loopback by default.

Kept off the public port: warming makes the service fetch (and cache) any version a caller
names, and the metrics expose every version's traffic; neither is a client's business.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from canaryflow.dataplane.forwarder import ServiceError
from canaryflow.dataplane.metrics import CONTENT_TYPE

if TYPE_CHECKING:
    from canaryflow.dataplane.service import ModelService


def admin_app(service: ModelService) -> Starlette:
    async def health(request: Request) -> Response:
        status = 200 if service.ready else 503
        body = {"ready": service.ready, "service": service.config.service}
        return JSONResponse(body, status_code=status)

    async def metrics_text(request: Request) -> Response:
        return Response(service.metrics.exposition(), media_type=CONTENT_TYPE)

    async def warm(request: Request) -> Response:
        """Resolve a version before traffic moves to it: its first users must not pay the fetch."""
        try:
            body = await request.json()
            plan = await service.warm(str(body["version"]))
        except ServiceError as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.status)
        except (KeyError, TypeError, ValueError):
            return JSONResponse({"error": 'body must be {"version": "N"}'}, status_code=400)
        return JSONResponse({"version": body["version"], "model_id": plan.manifest.model_id})

    return Starlette(
        routes=[
            Route("/metrics", metrics_text),
            Route("/health", health),
            Route("/admin/warm", warm, methods=["POST"]),
        ]
    )
