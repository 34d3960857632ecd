"""`/healthz` and `/health` (alive), `/readyz` (model and profiles loaded, not draining) and `/metrics`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from ..errors import envelope
from ..metrics import CONTENT_TYPE
from ..openapi import HEALTHY, METRICS_OK, READY, json_ok, responses

router = APIRouter(tags=["operations"])


@router.get("/healthz", responses={200: json_ok(HEALTHY)})
async def healthz() -> dict[str, Any]:
    return {"status": "ok"}


@router.get("/health", responses={200: json_ok(HEALTHY)})
async def health() -> dict[str, Any]:
    """vLLM's liveness path: the same as `/healthz`."""
    return {"status": "ok"}


@router.get("/readyz", responses=responses(503, ok={200: json_ok(READY)}))
async def readyz(request: Request) -> Response:
    state = request.app.state
    serving = getattr(state, "serving", None)
    if serving is None or getattr(state, "draining", False) or not serving.registry.loaded:
        body = envelope("not ready: loading or shutting down", "service_unavailable", None, "not_ready")
        return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})
    return JSONResponse(
        {
            "status": "ready",
            "model": serving.model_name,
            "profiles": serving.registry.names(),
            "skipped_profiles": [s.path for s in serving.registry.skipped],
            "engine": serving.engine.stats(),
            "backend": getattr(state.backend, "name", None),
            **(getattr(state.backend, "info", None) or {}),
        }
    )


@router.get("/metrics", response_class=PlainTextResponse, responses={200: METRICS_OK})
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)
