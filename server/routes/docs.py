"""`/openapi.json` and `/docs`: the API description (server/openapi.py) and its browser view, behind the
API key like the API they describe."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from ..auth import require_api_key

router = APIRouter(tags=["docs"], dependencies=[Depends(require_api_key)], include_in_schema=False)


@router.get("/openapi.json")
async def openapi(request: Request) -> JSONResponse:
    # built once the model is loaded, then kept; building probes the tokenizer (a fraction of a second)
    return JSONResponse(await run_in_threadpool(request.app.openapi))


@router.get("/docs")
async def docs(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "").rstrip("/")
    return get_swagger_ui_html(openapi_url=f"{root}/openapi.json", title=f"{request.app.title} - API")
